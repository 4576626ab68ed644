"""Synthesis component: `dermml synth3d` on the GPU pool (placement is set in the pipeline)."""

from kfp import dsl

from components.image import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def synthesize_views(lesions_uri: str, out_uri: str, bodies: str, views: int, size: int,
                     blend: str, seed: int, config: str, overrides: list,
                     parent_run_id: str, out_root: str = "") -> str:
    from dermml.orchestration.tracking import failing_parent
    from dermml.synthesis.run import default_out, resolve_config, synthesize

    with failing_parent(parent_run_id):  # a bad setting fails before the stage's run exists
        sets = [str(o) for o in overrides] + [
            f"lesions={lesions_uri}", f"bodies.source={bodies}", f"views.per_body={views}",
            f"views.size={size}", f"blend.method={blend}", f"seed={seed}"]
        cfg = resolve_config(config or None, sets)
        out_uri = out_uri or default_out(cfg, out_root)  # empty: one folder per settings
        outcome = synthesize(cfg, out_uri, parent_run_id=parent_run_id, progress=False)
    return outcome.manifest_uri
