"""Training component: Ray Train in this pod, or a KubeRay RayJob when the platform config the
pipeline was compiled with says so (``platform``: its JSON; empty for local runs)."""

from typing import NamedTuple

from kfp import dsl

from components.image import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_model(task: str, config: str, overrides: list, manifest_uri: str,
                parent_run_id: str, platform: str = "", synthetic_manifest: str = "",
                real_batch_ratio: float = 0.0
                ) -> NamedTuple("TrainOutputs", run_id=str, model_uri=str):
    from collections import namedtuple

    from dermml.orchestration.platform import platform_from_json
    from dermml.orchestration.tracking import failing_parent
    from dermml.training.run import resolve_config, train

    with failing_parent(parent_run_id):  # a bad override fails before the stage's run exists
        sets = [str(o) for o in overrides] + [f"data.manifest={manifest_uri}"]
        if synthetic_manifest and real_batch_ratio > 0:  # real share of every mixed batch
            sets.append(f"mix.real_batch_ratio={real_batch_ratio}")
        cfg = resolve_config(task, config or None, sets, synthetic_manifest=synthetic_manifest)
        outcome = train(task, cfg, parent_run_id=parent_run_id, progress=False,
                        platform=platform_from_json(platform))
    return namedtuple("TrainOutputs", ["run_id", "model_uri"])(outcome.run_id, outcome.model_uri)
