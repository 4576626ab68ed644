"""The errors that mean "your input is wrong" (a file, a config value, a flag), in one list:
the CLI prints them as one line, and Ray Train stops retrying a worker that raised one."""

from __future__ import annotations


def input_errors() -> tuple[type[BaseException], ...]:
    """DermML's own input-error types (imported on demand: the CLI starts fast)."""
    from dermml.config import ConfigError
    from dermml.data.images import ImageReadError
    from dermml.data.importers import DatasetImportError
    from dermml.data.manifest import ManifestError
    from dermml.models.pretrained import PretrainedWeightsError
    from dermml.storage import StorageError
    from dermml.synth3d.bodies import BodyError

    return (ConfigError, ManifestError, StorageError, ImageReadError, DatasetImportError,
            PretrainedWeightsError, BodyError)
