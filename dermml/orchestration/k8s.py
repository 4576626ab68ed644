"""Kubernetes placement of pipeline components, from a platform config (not from code).

A platform config names node pools (node selector, tolerations, requests/limits, accelerator),
maps each stage to a pool, and lists the Secrets exposed to components as env vars and the
plain env (MLflow URI, S3 endpoint). ``place(task, stage)`` applies it with kfp / kfp-kubernetes
when the pipeline is compiled; ``kfp.local`` ignores these settings, so local runs are unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from dermml.config import Section, load_config, shipped_config


class Toleration(Section):
    """A Kubernetes toleration."""

    key: str
    """Taint key, e.g. nvidia.com/gpu."""
    operator: str = "Exists"
    """Exists or Equal."""
    value: str | None = None
    """Taint value (operator Equal only)."""
    effect: str | None = "NoSchedule"
    """NoSchedule, PreferNoSchedule or NoExecute."""


class Pool(Section):
    """A node pool and the resources a component asks of it."""

    node_selector: dict[str, str] = {}
    """Node labels the pod must match."""
    tolerations: list[Toleration] = []
    """Taints the pod tolerates (GPU pools are tainted)."""
    cpu_request: str = "1"
    """CPU request."""
    memory_request: str = "2Gi"
    """Memory request."""
    cpu_limit: str | None = None
    """CPU limit (unset: none)."""
    memory_limit: str | None = "8Gi"
    """Memory limit."""
    accelerator_type: str | None = None
    """Accelerator resource, e.g. nvidia.com/gpu."""
    accelerator_limit: int = 0
    """Accelerators per pod."""


class SecretEnv(Section):
    """An existing Secret whose keys become env vars of every component."""

    name: str
    """Secret name."""
    keys: dict[str, str]
    """Secret key -> env var name."""


class PlatformConfig(Section):
    """Where pipeline components run on Kubernetes."""

    pools: dict[str, Pool] = {"cpu": Pool()}
    """Named node pools."""
    stages: dict[str, str] = {}
    """Stage name -> pool name; unlisted stages use ``default_pool``."""
    default_pool: str = "cpu"
    """Pool of stages not listed in ``stages``."""
    secrets: list[SecretEnv] = []
    """Secrets exposed as env (S3 credentials, MLflow credentials)."""
    env: dict[str, str] = {}
    """Plain env vars (MLFLOW_TRACKING_URI, DERMML_S3_ENDPOINT, DERMML_HOME)."""
    data_pvc: str | None = None
    """PersistentVolumeClaim mounted at ``data_mount_path`` (alternative to S3)."""
    data_mount_path: str = "/data"
    """Where ``data_pvc`` is mounted."""

    def pool_for(self, stage: str) -> Pool:
        name = self.stages.get(stage, self.default_pool)
        if name not in self.pools:
            raise KeyError(f"stage {stage!r} uses pool {name!r}, which is not defined; "
                           f"pools: {', '.join(self.pools)}")
        return self.pools[name]


_active: PlatformConfig | None = None


def load_platform(path: str | os.PathLike | None = None) -> PlatformConfig:
    """The platform config at ``path``, ``$DERMML_PLATFORM``, or the shipped default."""
    path = path or os.environ.get("DERMML_PLATFORM") or shipped_config("platform",
                                                                       "default.yaml")
    return load_config(PlatformConfig, path)


def active_platform() -> PlatformConfig:
    return _active if _active is not None else load_platform()


@contextlib.contextmanager
def using_platform(platform: PlatformConfig) -> Iterator[PlatformConfig]:
    """Compile pipelines with ``platform`` in force."""
    global _active
    previous, _active = _active, platform
    try:
        yield platform
    finally:
        _active = previous


def place(task, stage: str):
    """Apply the active platform's placement, resources, secrets and env to a pipeline task."""
    from kfp import kubernetes

    platform = active_platform()
    pool = platform.pool_for(stage)
    task.set_cpu_request(pool.cpu_request).set_memory_request(pool.memory_request)
    if pool.cpu_limit:
        task.set_cpu_limit(pool.cpu_limit)
    if pool.memory_limit:
        task.set_memory_limit(pool.memory_limit)
    if pool.accelerator_type and pool.accelerator_limit:
        task.set_accelerator_type(pool.accelerator_type)
        task.set_accelerator_limit(pool.accelerator_limit)
    for key, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in pool.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value,
                                  effect=tol.effect)
    for secret in platform.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.name,
                                     secret_key_to_env=dict(secret.keys))
    for name, value in platform.env.items():
        task.set_env_variable(name, value)
    if platform.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=platform.data_pvc,
                             mount_path=platform.data_mount_path)
    return task
