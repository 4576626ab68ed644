"""Submit and schedule pipelines on a Kubeflow Pipelines instance through ``kfp.Client``.

Each submission checks that the run's training fits the platform config, compiles the pipeline
with it, uploads it as a new version of the pipeline (creating the pipeline on first use), and
starts a run or a recurring run in the named experiment, namespace and service account, with the
pipeline root on S3.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermml.orchestration.kfp_local import (
    PipelineDef,
    check_params,
    check_training_fit,
    compile_pipeline,
)
from dermml.orchestration.platform import load_platform


@dataclass
class Target:
    """Where and as whom a pipeline runs."""

    host: str
    experiment: str = "dermml"
    namespace: str = "kubeflow"
    service_account: str = "pipeline-runner"
    """KFP standalone runs steps as `pipeline-runner`; the chart binds it to its Role."""
    pipeline_root: str | None = None
    """e.g. ``s3://dermml-pipelines/root``; None uses the KFP instance's default."""
    platform: str | None = None
    """Platform config used to compile (pools, secrets, env)."""


def _client(target: Target):
    import kfp

    token = os.environ.get("KFP_TOKEN") or None
    return kfp.Client(host=target.host, namespace=target.namespace, existing_token=token)


def _upload(client, pipeline: PipelineDef, target: Target) -> tuple[str, str]:
    """(pipeline_id, version_id) of a freshly uploaded version of ``pipeline``."""
    pipeline_name = f"dermml-{pipeline.name}"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as folder:
        package = compile_pipeline(pipeline, str(Path(folder, f"{pipeline.name}.yaml")),
                                   target.platform)
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(package, pipeline_name,
                                              description=f"DermML {pipeline.name} pipeline")
            pipeline_id = pipeline.pipeline_id
        version = client.upload_pipeline_version(package, f"{pipeline_name}-{stamp}",
                                                 pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _checked_upload(pipeline: PipelineDef, target: Target, params: dict[str, Any]):
    """Parameters and training fit checked before any network call; then the client, the
    experiment and the uploaded pipeline version."""
    check_params(pipeline, params)
    check_training_fit(pipeline, params, load_platform(target.platform))
    client = _client(target)
    experiment = client.create_experiment(target.experiment, namespace=target.namespace)
    pipeline_id, version_id = _upload(client, pipeline, target)
    return client, experiment, pipeline_id, version_id


def submit(pipeline: PipelineDef, target: Target, params: dict[str, Any],
           run_name: str | None = None) -> dict[str, str]:
    """Upload ``pipeline`` and start one run; returns ids and the run's UI URL."""
    client, experiment, pipeline_id, version_id = _checked_upload(pipeline, target, params)
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=run_name or f"{pipeline.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}",
        params=params, pipeline_id=pipeline_id, version_id=version_id,
        pipeline_root=target.pipeline_root, enable_caching=False,
        service_account=target.service_account)
    return {"run_id": run.run_id, "pipeline_id": pipeline_id, "version_id": version_id,
            "experiment_id": experiment.experiment_id,
            "url": f"{target.host.rstrip('/')}/#/runs/details/{run.run_id}"}


def schedule(pipeline: PipelineDef, target: Target, params: dict[str, Any], cron: str,
             job_name: str | None = None, max_concurrency: int = 1) -> dict[str, str]:
    """Create a recurring run of ``pipeline`` on a cron schedule (KFP's 6-field cron)."""
    fields = cron.split()
    if len(fields) == 5:  # accept standard cron; KFP wants seconds first
        cron = f"0 {cron}"
    elif len(fields) != 6:
        raise ValueError(f"cron {cron!r}: expected 5 or 6 fields, e.g. '0 2 * * *'")
    client, experiment, pipeline_id, version_id = _checked_upload(pipeline, target, params)
    job = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=job_name or f"{pipeline.name}-scheduled",
        cron_expression=cron, max_concurrency=max_concurrency, no_catchup=True, params=params,
        pipeline_id=pipeline_id, version_id=version_id, pipeline_root=target.pipeline_root,
        enable_caching=False, service_account=target.service_account)
    return {"recurring_run_id": job.recurring_run_id, "pipeline_id": pipeline_id,
            "version_id": version_id, "cron": cron}
