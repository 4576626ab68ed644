"""Tasks are plug-ins: one object per task, registered by name (see ``dermml.tasks.base``)."""

from dermml.tasks.base import Task, get_task, register_task, task_names

# Registration lines: importing a task module registers it.
from dermml.tasks import segmentation  # noqa: E402,F401  isort: skip
from dermml.tasks import classification  # noqa: E402,F401  isort: skip
from dermml.tasks import attributes  # noqa: E402,F401  isort: skip
from dermml.tasks import segdiff  # noqa: E402,F401  isort: skip
from dermml.tasks import gan  # noqa: E402,F401  isort: skip
from dermml.tasks import multitask  # noqa: E402,F401  isort: skip
from dermml.tasks import detection  # noqa: E402,F401  isort: skip

__all__ = ["Task", "get_task", "register_task", "task_names"]
