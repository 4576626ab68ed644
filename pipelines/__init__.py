"""KFP pipelines: wiring of components, nothing else.

``PIPELINES`` maps names to builders; a builder returns the pipeline graph built under the
platform config in force (KFP runs a pipeline body when it is decorated).
"""

from pipelines.synthesis import build_synthesis_pipeline, synthesis_pipeline
from pipelines.training import build_training_pipeline, training_pipeline

PIPELINES = {"training": build_training_pipeline, "synthesis": build_synthesis_pipeline}
SIGNATURES = {"training": training_pipeline, "synthesis": synthesis_pipeline}
