"""Logging set-up for Ray worker processes (``worker_process_setup_hook``); imports nothing heavy.
"""

import logging
import os


def quiet_worker_logs() -> None:
    """Ray Train's placement-group cleaner polls the state API, which lives in the dashboard;
    without one (local runs use ``include_dashboard=False``) it warns every few seconds for the
    whole run. Its real failures are errors, which still show.

    Each epoch's report also logs ``Reporting training result N: TrainingReport(...)``, the
    repr of every metric and the checkpoint, at INFO; our epoch line says what matters. That
    logger is named after its file (``logging.getLogger(__file__)``), found here next to the
    already imported ``ray`` package; its warnings still show."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)
    import ray

    reporter = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                            "execution", "context.py")
    logging.getLogger(reporter).setLevel(logging.WARNING)
