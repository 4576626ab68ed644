"""Rollout component: serving follows the promotion (KServe canary, judged, rolled out or back).

Only in pipelines compiled with a platform config that has ``serving.kserve: true``; it runs on
the CPU pool (it only talks to the Kubernetes API and Prometheus) and fails when the canary is
rolled back.
"""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def roll_out_model(task: str, version: str, promoted: bool, parent_run_id: str,
                   platform: str) -> str:
    from dermml.orchestration.platform import platform_from_json
    from dermml.orchestration.tracking import failing_parent
    from dermml.serving.rollout import roll_out

    with failing_parent(parent_run_id):
        outcome = roll_out(task, version, promoted, platform_from_json(platform), parent_run_id)
    print(outcome)
    return outcome
