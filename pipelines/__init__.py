"""KFP pipelines: wiring of components, nothing else.

``PIPELINES`` maps names to ``PipelineDef``s (the pipeline function and a builder that returns
the graph built under the platform config in force: KFP runs a pipeline body when it is
decorated). The CLI looks a pipeline up here and hands it to the KFP adapter.
"""

from dermml.orchestration.kfp_local import PipelineDef
from pipelines.gan_augmentation import (
    build_gan_augmentation_pipeline,
    gan_augmentation_pipeline,
)
from pipelines.synthesis import build_synthesis_pipeline, synthesis_pipeline
from pipelines.synthetic_value import (
    build_synthetic_value_pipeline,
    synthetic_value_pipeline,
)
from pipelines.training import build_training_pipeline, training_pipeline
from pipelines.tuning import build_tuning_pipeline, tuning_pipeline

PIPELINES = {"training": PipelineDef("training", training_pipeline, build_training_pipeline,
                                     trains=True),
             "tuning": PipelineDef("tuning", tuning_pipeline, build_tuning_pipeline,
                                   trains=True),
             "synthesis": PipelineDef("synthesis", synthesis_pipeline,
                                      build_synthesis_pipeline),
             "gan-augmentation": PipelineDef("gan-augmentation", gan_augmentation_pipeline,
                                             build_gan_augmentation_pipeline,
                                             trains=(("gan", "gan_config", "gan_overrides"),
                                                     ("classification", "classifier_config",
                                                      "classifier_overrides"))),
             "synthetic-value": PipelineDef("synthetic-value", synthetic_value_pipeline,
                                            build_synthetic_value_pipeline,
                                            trains=(("", "config", "overrides"),
                                                    ("gan", "gan_config", "gan_overrides")))}


def get_pipeline(name: str) -> PipelineDef:
    """The pipeline called ``name``; an unknown name is an error listing the known ones."""
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; known pipelines: {', '.join(PIPELINES)}")
    return PIPELINES[name]
