"""KFP pipelines: wiring of components, nothing else. ``PIPELINES`` maps names to functions."""

from pipelines.training import training_pipeline

PIPELINES = {"training": training_pipeline}
