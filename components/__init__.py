"""KFP components: one thin, typed wrapper per dermml stage (no logic the CLI lacks)."""

from components.data import prepare_data
from components.evaluate import evaluate_model
from components.gan import compare_models, generate_images, measure_synthetic_value
from components.registry import promote_model, register_model
from components.serving import roll_out_model
from components.synthesize import synthesize_views
from components.tracking import finish_pipeline_run, start_pipeline_run
from components.train import train_model
from components.tune import tune_model
from components.validate import validate_data

__all__ = ["compare_models", "evaluate_model", "finish_pipeline_run", "generate_images",
           "measure_synthetic_value", "prepare_data", "promote_model", "register_model",
           "roll_out_model", "start_pipeline_run", "synthesize_views", "train_model",
           "tune_model", "validate_data"]
