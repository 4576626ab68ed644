"""Evaluation component: metrics on the test split, also shown as KFP Metrics. It runs the model
over the whole split (diffusion sampling: T steps x ensemble per image), so it uses the GPU
image and, in the shipped platform config, the GPU pool."""

from kfp import dsl

from components.image import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate_model(model_uri: str, manifest_uri: str, splits: str, parent_run_id: str,
                   n_resamples: int, metrics: dsl.Output[dsl.Metrics]) -> str:
    from dermml.evaluation.run import evaluate
    from dermml.orchestration.tracking import failing_parent
    from dermml.registry.gate import record_evaluation

    with failing_parent(parent_run_id):
        result = evaluate(model_uri, manifest_uri, splits.split(","), parent_run_id,
                          n_resamples=n_resamples)
        record_evaluation(result)  # the promote stage compares these scores
    for name, value in result.flat_metrics().items():
        metrics.log_metric(name, value)
    return result.run_id
