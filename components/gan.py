"""Synthetic-data components: images of a registered generator (GPU pool), the comparison of
models trained with and without them, and the whole synthetic-value measurement (arms x
fractions x seeds; one table and plot in the pipeline's parent run)."""

from kfp import dsl

from components.image import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def generate_images(model_uri: str, manifest_uri: str, per_class: str, train_split: str,
                    out_root: str, parent_run_id: str) -> str:
    from dermml.orchestration.tracking import failing_parent
    from dermml.synthesis.gan import parse_per_class, per_class_like, synthetic_training_set

    with failing_parent(parent_run_id):
        counts = parse_per_class(per_class) if per_class else per_class_like(
            manifest_uri, train_split)
        return synthetic_training_set(model_uri, counts, out_root)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare_models(task: str, arms: list, split: str, metric: str, n_resamples: int,
                   parent_run_id: str) -> str:
    from dermml.evaluation.compare import compare_arms, log_comparison, per_sample_records
    from dermml.orchestration.tracking import failing_parent

    with failing_parent(parent_run_id):
        records = {}
        for arm in arms:  # "name=evaluation_run_id"
            name, _, run_id = str(arm).partition("=")
            records[name] = per_sample_records(run_id, split)
        comparison = compare_arms(task, records, metric, n_resamples)
        log_comparison(comparison, parent_run_id)
    table = comparison.table
    print(table.to_string(index=False))
    return table.to_json(orient="records")


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def measure_synthetic_value(task: str, manifest_uri: str, sources: list, fractions: str,
                            seeds: str, config: str, overrides: list, test_split: str,
                            n_resamples: int, parent_run_id: str) -> str:
    from dermml.evaluation.synthetic_value import measure_synthetic_value as measure
    from dermml.orchestration.tracking import failing_parent

    with failing_parent(parent_run_id):
        named = dict(str(s).split("=", 1) for s in sources)  # "name=manifest URI"
        value = measure(task, manifest_uri, named,
                        [float(f) for f in fractions.split(",") if f.strip()],
                        [int(s) for s in seeds.split(",") if s.strip()], config or None,
                        [str(o) for o in overrides], test_split, parent_run_id, n_resamples)
    print(value.table.to_string(index=False))
    return value.table.to_json(orient="records")
