"""A RayJob's life as the train stage sees it, against a fake Kubernetes API that plays KubeRay
v1.7.0 (fake_k8s): retries followed to the end, the job deleted on failure, on cancellation
and (by default) on success, its logs streamed into the stage's output, and the submitting step
placed on the CPU pool."""

from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest
import yaml
from fake_k8s import FakeKubeRay
from test_kubernetes_pipeline import executor_of, k8s_config, load_docs
from test_rayjob import gpu_cfg, rayjob_platform, validate_strictly

from dermml.orchestration.kfp_local import compile_pipeline
from dermml.orchestration.rayjob import (
    RayJobCancelled,
    RayJobFailed,
    rayjob_manifest,
    run_rayjob,
    wait_timeout,
)
from pipelines import get_pipeline

# What each attempt runs (FAKE_RAYJOB_ATTEMPT: 1, 2, ...).
FAIL_THEN_SUCCEED = ("import os, sys; n = int(os.environ['FAKE_RAYJOB_ATTEMPT']); "
                     "print(f'epoch 1 of attempt {n}'); "
                     "sys.exit('CUDA error: an illegal memory access' if n == 1 else 0)")
ALWAYS_FAIL = ("import os, sys; n = os.environ['FAKE_RAYJOB_ATTEMPT']; "
               "print(f'attempt {n} starts'); sys.exit(f'attempt {n}: loss is NaN')")
RUN_LONG = "import time; print('training...', flush=True); time.sleep(120)"


@pytest.fixture
def kuberay(tmp_path, monkeypatch):
    with FakeKubeRay(tmp_path) as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fake


def job_of(script: str, run_id: str, **ray_job):
    """A RayJob as the train stage builds it (placed by the shipped cloud platform), running
    ``script``; and the platform's ray_job section."""
    platform = rayjob_platform(poll_seconds=0.2, **ray_job)
    manifest = rayjob_manifest("segmentation", gpu_cfg(), run_id, platform,
                               command=["python", "-c", script])
    validate_strictly(manifest)
    return manifest, platform.ray_job


def states(kuberay: FakeKubeRay, name: str) -> list[str]:
    """The jobDeploymentStatus values the stage was shown, repeats left out."""
    seen = [s.get("jobDeploymentStatus") for s in kuberay.history[name]]
    return [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]


def in_order(sequence: list[str], expected: list[str]) -> bool:
    it = iter(sequence)
    return all(item in it for item in expected)


def test_a_job_retried_by_kuberay_then_complete_succeeds(kuberay, capsys):
    """KubeRay reports the failed first attempt as jobStatus FAILED + Retrying: the stage must
    follow it to the second attempt's Complete, not fail on the first FAILED."""
    manifest, job = job_of(FAIL_THEN_SUCCEED, "retrythensucceed01", backoff_limit=2)
    name = manifest["metadata"]["name"]
    status = run_rayjob(manifest, job)

    assert status["jobDeploymentStatus"] == "Complete" and status["jobStatus"] == "SUCCEEDED"
    seen = states(kuberay, name)  # a short attempt may end between two polls
    assert in_order(seen, ["Running", "Retrying", "Initializing", "Complete"]), seen
    assert seen[-1] == "Complete" and seen.count("Retrying") == 1
    retrying = next(s for s in kuberay.history[name] if s["jobDeploymentStatus"] == "Retrying")
    assert retrying["jobStatus"] == "FAILED"
    assert len(kuberay.attempts(name)) == 2
    assert kuberay.deleted == [name]  # ray_job.delete_on_success (default true)
    out = capsys.readouterr().out
    first, second = (a.pod for a in kuberay.attempts(name))
    # Both attempts' logs, each line under its submitter pod's name, in the stage's output.
    assert f"[{first}] epoch 1 of attempt 1" in out
    assert f"[{first}] CUDA error: an illegal memory access" in out
    assert f"[{second}] epoch 1 of attempt 2" in out
    assert "attempt 1 of 3 failed (AppFailed); KubeRay retries it" in out


def test_a_successful_job_is_kept_when_the_platform_says_so(kuberay):
    manifest, job = job_of("print('done')", "keeponsuccess0001", delete_on_success=False)
    run_rayjob(manifest, job)
    assert kuberay.deleted == []
    assert not kuberay.state[manifest["metadata"]["name"]].deleted


def test_a_job_failing_every_attempt_fails_the_stage_and_is_deleted(kuberay, capsys):
    manifest, job = job_of(ALWAYS_FAIL, "retrythenfailed01", backoff_limit=1)
    name = manifest["metadata"]["name"]
    with pytest.raises(RayJobFailed) as error:
        run_rayjob(manifest, job)

    seen = states(kuberay, name)
    assert in_order(seen, ["Running", "Retrying", "Initializing", "Failed"]), seen
    assert seen[-1] == "Failed" and seen.count("Retrying") == 1
    assert len(kuberay.attempts(name)) == 2  # backoffLimit 1: one retry, no more
    message = str(error.value)
    for part in (name, "ended Failed", "job FAILED", "AppFailed", "2 failed attempt(s)",
                 "at most 2", "entrypoint exited with 1"):
        assert part in message, (part, message)
    assert kuberay.deleted == [name]
    out = capsys.readouterr().out
    for attempt in kuberay.attempts(name):
        number = attempt.pod.split("-")[-2]
        assert f"[{attempt.pod}] attempt {number}: loss is NaN" in out


def test_a_job_kuberay_refuses_fails_at_once_and_is_deleted(kuberay):
    manifest, job = job_of(RUN_LONG, "validationfailed1")
    del manifest["spec"]["rayClusterSpec"]  # neither a cluster to create nor one to use
    name = manifest["metadata"]["name"]
    with pytest.raises(RayJobFailed, match="ValidationFailed.*RayClusterTemplate"):
        run_rayjob(manifest, job)
    assert kuberay.deleted == [name] and not kuberay.attempts(name)


def test_a_job_deleted_by_someone_else_fails_the_stage(kuberay):
    manifest, job = job_of(RUN_LONG, "deletedbyanother01")
    name = manifest["metadata"]["name"]
    cancel_when_running(kuberay, name, lambda: kuberay._delete(name))
    with pytest.raises(RayJobFailed, match="was deleted while the stage waited"):
        run_rayjob(manifest, job)


def test_a_short_api_outage_does_not_end_the_wait(kuberay, capsys):
    manifest, job = job_of("print('done')", "apioutage00000001")
    kuberay.unavailable = 3
    status = run_rayjob(manifest, job)
    assert status["jobStatus"] == "SUCCEEDED"
    assert capsys.readouterr().out.count("Kubernetes API: 503") == 3


def cancel_when_running(kuberay: FakeKubeRay, name: str, cancel) -> threading.Thread:
    def run():
        deadline = time.monotonic() + 60
        while not kuberay.running(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a poll or two into the wait
        cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_to_the_stage_deletes_its_job(kuberay, capsys):
    """KFP cancels a run by terminating its step pods: SIGTERM to the stage's process while it
    waits must delete the RayJob (KubeRay then stops the Ray job and frees the GPUs)."""
    import os

    manifest, job = job_of(RUN_LONG, "cancelledbysigterm")
    name = manifest["metadata"]["name"]
    before = signal.getsignal(signal.SIGTERM)
    cancel_when_running(kuberay, name, lambda: os.kill(os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    with pytest.raises(RayJobCancelled, match="SIGTERM"):
        run_rayjob(manifest, job)

    assert time.monotonic() - started < 30  # not the job's 120 s
    assert kuberay.deleted == [name]
    (attempt,) = kuberay.attempts(name)
    assert attempt.process.wait(timeout=10) is not None  # its Ray job is gone with it
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only for the wait
    out = capsys.readouterr().out
    assert f"[{attempt.pod}] training..." in out
    assert "stage cancelled: deleting the RayJob" in out


def test_ctrl_c_while_waiting_deletes_the_job(kuberay):
    manifest, job = job_of(RUN_LONG, "cancelledbyctrlc01")
    name = manifest["metadata"]["name"]
    cancel_when_running(kuberay, name, _thread.interrupt_main)
    with pytest.raises(KeyboardInterrupt):
        run_rayjob(manifest, job)
    assert kuberay.deleted == [name]


def test_the_wait_outlasts_every_attempt_kuberay_may_make():
    job = rayjob_platform().ray_job
    assert wait_timeout(job) > (job.backoff_limit + 1) * job.active_deadline_seconds


# ----------------------------------------------------------------------------- placement
def test_the_step_that_submits_a_rayjob_runs_on_the_cpu_pool_with_a_small_pod(tmp_path):
    """With ray_job.enabled the train and tune steps only submit and wait: CPU pool, CPU image,
    small requests, no GPU; the scoring steps stay on the GPU pool."""
    platform = rayjob_platform()
    custom = tmp_path / "platform.yaml"
    custom.write_text(yaml.safe_dump(platform.model_dump(mode="json")))
    job = platform.ray_job
    for pipeline_name, stage_task in (("training", "train-model"), ("tuning", "tune-model")):
        pipeline, k8s = load_docs(compile_pipeline(get_pipeline(pipeline_name),
                                                   str(tmp_path / f"{pipeline_name}.yaml"),
                                                   str(custom)))
        executor = executor_of(pipeline, stage_task)
        container = pipeline["deploymentSpec"]["executors"][executor]["container"]
        resources = container["resources"]
        assert "accelerator" not in resources, pipeline_name
        assert resources["cpuRequest"] == 0.25 and resources["resourceCpuRequest"] == "250m"
        assert resources["resourceMemoryRequest"] == job.step_memory_request == "1Gi"
        assert resources["resourceMemoryLimit"] == job.step_memory_limit
        assert "cpuLimit" not in resources
        assert container["image"] == platform.images["cpu"]
        placement = k8s_config(k8s, executor)
        assert placement["nodeSelector"]["labels"] == platform.pools["cpu"].node_selector
        assert "tolerations" not in placement
        # Still a DermML step: its Secrets, and the labels the NetworkPolicies admit.
        assert {s["secretName"] for s in placement["secretAsEnv"]} == {"dermml-s3",
                                                                      "dermml-mlflow"}
        assert placement["podMetadata"]["labels"] == platform.step_labels
        scorer = executor_of(pipeline, "evaluate-model")
        assert pipeline["deploymentSpec"]["executors"][scorer]["container"]["resources"][
            "accelerator"]["resourceType"] == "nvidia.com/gpu"


def test_without_rayjobs_the_train_step_keeps_the_gpu_pool(tmp_path):
    pipeline, k8s = load_docs(compile_pipeline(get_pipeline("training"),
                                               str(tmp_path / "t.yaml")))
    executor = executor_of(pipeline, "train-model")
    container = pipeline["deploymentSpec"]["executors"][executor]["container"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert k8s_config(k8s, executor)["nodeSelector"]["labels"] == {"dermml.io/pool": "gpu"}


def test_a_step_pool_that_does_not_exist_is_a_clear_error(tmp_path):
    custom = tmp_path / "platform.yaml"
    platform = rayjob_platform(step_pool="tiny")
    custom.write_text(yaml.safe_dump(platform.model_dump(mode="json")))
    with pytest.raises(KeyError, match="ray_job.step_pool names pool 'tiny'"):
        compile_pipeline(get_pipeline("training"), str(tmp_path / "t.yaml"), str(custom))

