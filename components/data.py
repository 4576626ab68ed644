"""Data component: the given manifest, or procedural demo data made (once) under demo_root."""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(manifest_uri: str, demo_root: str, demo_n: int, demo_size: int,
                 seed: int, parent_run_id: str) -> str:
    from dermml.data.run import prepare_dataset
    from dermml.orchestration.tracking import failing_parent

    with failing_parent(parent_run_id):
        return prepare_dataset(manifest_uri, demo_root, demo_n, demo_size, seed)
