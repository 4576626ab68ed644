"""Registry components: register as challenger; promote to champion through the gate."""

from typing import NamedTuple

from kfp import dsl

from components.image import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(model_uri: str, task: str,
                   parent_run_id: str) -> NamedTuple("Registered", version=str, version_uri=str):
    from collections import namedtuple

    from dermml.orchestration.tracking import failing_parent
    from dermml.registry.gate import model_name, register

    with failing_parent(parent_run_id):
        version = register(model_uri, task)
    return namedtuple("Registered", ["version", "version_uri"])(
        version, f"models:/{model_name(task)}/{version}")


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)  # scores the model
def promote_model(task: str, version: str, manifest_uri: str, split: str, min_delta: float,
                  parent_run_id: str, min_per_group: list = []) -> bool:  # noqa: B006
    from dermml.orchestration.tracking import failing_parent
    from dermml.registry.gate import parse_floors, promote

    with failing_parent(parent_run_id):
        decision = promote(task, version, manifest_uri, split, None, min_delta, parent_run_id,
                           min_per_group=parse_floors([str(f) for f in min_per_group]))
    print(decision.reason)
    return decision.promoted
