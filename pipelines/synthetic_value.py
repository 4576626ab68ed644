"""Synthetic-value pipeline: does synthetic data help this task, by how much, for whom?

data -> validate -> 3D synthesis from the data's lesions -> train a GAN (image + mask by
default, so its samples train segmentation too) -> register -> generate -> train the task on
real, real + 3D, real + GAN and real + both at each synthetic fraction and seed, evaluate every
model on the same real test split (overall and per skin-tone group) -> one table and plot in
the parent run (``synthetic_value/``). Runs on demo data in minutes on CPU with the defaults;
the same pipeline runs at full size on the GPU pool.
"""

from typing import NamedTuple

from kfp import dsl

from components import (
    finish_pipeline_run,
    generate_images,
    measure_synthetic_value,
    prepare_data,
    register_model,
    start_pipeline_run,
    synthesize_views,
    train_model,
    validate_data,
)
from dermml.orchestration.platform import platform_json
from pipelines.gate import place_steps

DEMO_GAN = ["gan.with_masks=true", "data.image_size=32", "model.z_dim=64", "model.w_dim=64",
            "model.mapping_layers=2", "model.channel_base=2048", "model.channel_max=64",
            "gan.kimg=1", "gan.tick_kimg=0.5", "metrics.every_ticks=0", "gan.mirror=true"]
"""The default GAN: image + mask pairs, small and short (CPU minutes). At full size pass
``gan_config`` (e.g. configs/gan/auto.yaml) and ``gan_overrides=["gan.with_masks=true"]``."""


class SyntheticValueOutputs(NamedTuple):
    parent_run_id: str
    synth3d_manifest: str
    gan_manifest: str
    table: str


def synthetic_value_pipeline(task: str = "segmentation", config: str = "",
                             overrides: list = [],  # noqa: B006
                             manifest_uri: str = "", demo_root: str = "", demo_n: int = 160,
                             demo_size: int = 64, seed: int = 0,
                             synthetic_root: str = "", bodies: str = "procedural:2",
                             views: int = 10, view_size: int = 64, blend: str = "paste",
                             synth3d_config: str = "",
                             synth3d_overrides: list = [],  # noqa: B006
                             gan_config: str = "",
                             gan_overrides: list = DEMO_GAN,  # noqa: B006
                             synthetic_per_class: str = "",
                             fractions: str = "0.5", seeds: str = "0,1",
                             test_split: str = "test",
                             bootstrap_resamples: int = 200) -> SyntheticValueOutputs:
    parent = start_pipeline_run(task=task, pipeline="synthetic-value")
    data = prepare_data(manifest_uri=manifest_uri, demo_root=demo_root, demo_n=demo_n,
                        demo_size=demo_size, seed=seed, parent_run_id=parent.output)
    checked = validate_data(manifest_uri=data.output, suite=task,
                            required_splits="train,val,test", parent_run_id=parent.output,
                            custom_suite="", overrides=[], warn_only=False)
    manifest = checked.outputs["Output"]
    synth = synthesize_views(lesions_uri=manifest, out_uri="", out_root=synthetic_root,
                             bodies=bodies, views=views, size=view_size, blend=blend, seed=seed,
                             config=synth3d_config, overrides=synth3d_overrides,
                             parent_run_id=parent.output)
    gan = train_model(task="gan", config=gan_config, overrides=gan_overrides,
                      manifest_uri=manifest, parent_run_id=parent.output,
                      platform=platform_json(), synthetic_manifest="")
    gan.set_display_name("train-gan")
    registered = register_model(model_uri=gan.outputs["model_uri"], task="gan",
                                parent_run_id=parent.output)
    generated = generate_images(model_uri=registered.outputs["version_uri"],
                                manifest_uri=manifest, per_class=synthetic_per_class,
                                train_split="train", out_root=synthetic_root,
                                parent_run_id=parent.output)
    measured = measure_synthetic_value(
        task=task, manifest_uri=manifest,
        sources=[f"synth3d={synth.output}", f"gan={generated.output}"],
        fractions=fractions, seeds=seeds, config=config, overrides=overrides,
        test_split=test_split, n_resamples=bootstrap_resamples, parent_run_id=parent.output)
    finished = finish_pipeline_run(parent_run_id=parent.output).after(measured)
    place_steps({"tracking": parent, "data": data, "validate": checked, "synthesize": synth,
                 "register": registered, "finish": finished})
    place_steps({"train": gan})
    place_steps({"synthesize": generated})
    place_steps({"train": measured})  # trains and scores every arm: the GPU pool
    return SyntheticValueOutputs(parent_run_id=parent.output, synth3d_manifest=synth.output,
                                 gan_manifest=generated.output, table=measured.output)


def build_synthetic_value_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-synthetic-value",
                        description="Measure whether 3D-synthetic and GAN images help a task "
                        "on real test data, overall and per skin tone.")(
        synthetic_value_pipeline)
