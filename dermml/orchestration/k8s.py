"""Kubernetes placement of pipeline steps, from the platform config (``platform.py``).

``place(task, stage)`` applies the platform config in force when a pipeline is built: the image
of the component's flavour, the stage's pool (node selector, tolerations, requests/limits,
accelerator), the Secrets as env vars, the plain env, the pod labels the chart's NetworkPolicies
admit (``step_labels``) and the data volume, with kfp / kfp-kubernetes. ``kfp.local`` ignores
these settings, so local runs are unchanged.

``api_client()`` is the one way DermML reaches the Kubernetes API (RayJobs, InferenceServices):
the pod's service account in a cluster, else ``$KUBECONFIG`` / ``~/.kube/config``.
"""

from __future__ import annotations

import os

from dermml.orchestration.platform import active_platform, flavour_of


class NoCluster(RuntimeError):
    """No Kubernetes API to talk to: neither in a pod nor a kube context here."""


def api_client(api_client=None):
    """A Kubernetes ``ApiClient``: ``api_client`` when given, else the in-cluster service
    account, else the current context of ``$KUBECONFIG`` (read now: the library reads it once
    at import). ``NoCluster`` when there is neither."""
    from kubernetes import client, config

    if api_client is not None:
        return api_client
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, OSError) as error:
            raise NoCluster(f"no Kubernetes cluster: not in a pod and no kube context "
                            f"({error})") from None
    return client.ApiClient()


def place(task, stage: str):
    """Apply the active platform's image, placement, resources, secrets and env to a step."""
    from kfp import kubernetes

    platform = active_platform()
    # A step that submits a RayJob (train, tune with ray_job.enabled) only waits for it: the
    # CPU pool with a small pod, whatever the component would need to train itself.
    pool = platform.step_pool(stage)
    container = task.container_spec
    flavour = flavour_of(container.image if container is not None else None)
    if flavour is not None:
        container.image = platform.image(platform.step_flavour(stage, flavour),
                                         f"stage {stage!r}")
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
    # The chart's NetworkPolicies admit the step to MLflow and Ray by these labels.
    for key, value in platform.step_labels.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    if platform.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=platform.data_pvc,
                             mount_path=platform.data_mount_path)
    return task
