"""GAN augmentation pipeline: does adding GAN images help the classifier?

data -> validate -> train the GAN -> register it -> generate images per class -> train the
classifier on real data, and on real + synthetic (same config and seed) -> evaluate both on the
same real test split -> compare (paired bootstrap CIs of every metric and of the difference),
logged as one table and plot in the parent run.
"""

from typing import NamedTuple

from kfp import dsl

from components import (
    compare_models,
    evaluate_model,
    finish_pipeline_run,
    generate_images,
    prepare_data,
    register_model,
    start_pipeline_run,
    train_model,
    validate_data,
)
from dermml.orchestration.platform import platform_json
from pipelines.gate import place_steps


class GanAugmentationOutputs(NamedTuple):
    parent_run_id: str
    gan_version: str
    synthetic_manifest: str
    comparison: str


def gan_augmentation_pipeline(manifest_uri: str = "", demo_root: str = "", demo_n: int = 160,
                              demo_size: int = 64, seed: int = 0,
                              gan_config: str = "", gan_overrides: list = [],  # noqa: B006
                              classifier_config: str = "",
                              classifier_overrides: list = [],  # noqa: B006
                              synthetic_per_class: str = "", synthetic_root: str = "",
                              real_batch_ratio: float = 0.5, test_split: str = "test",
                              bootstrap_resamples: int = 200,
                              compare_metric: str = "balanced_accuracy"
                              ) -> GanAugmentationOutputs:
    parent = start_pipeline_run(task="gan", pipeline="gan-augmentation")
    data = prepare_data(manifest_uri=manifest_uri, demo_root=demo_root, demo_n=demo_n,
                        demo_size=demo_size, seed=seed, parent_run_id=parent.output)
    checked = validate_data(manifest_uri=data.output, suite="classification",
                            required_splits="train,val,test", parent_run_id=parent.output,
                            custom_suite="", overrides=[], warn_only=False)
    manifest = checked.outputs["Output"]
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
    arms = {}
    for arm, synthetic in (("real", ""), ("real_gan", generated.output)):
        trained = train_model(task="classification", config=classifier_config,
                              overrides=classifier_overrides, manifest_uri=manifest,
                              parent_run_id=parent.output, platform=platform_json(),
                              synthetic_manifest=synthetic, real_batch_ratio=real_batch_ratio)
        trained.set_display_name(f"train-classifier-{arm}")
        evaluated = evaluate_model(model_uri=trained.outputs["model_uri"], manifest_uri=manifest,
                                   splits=test_split, parent_run_id=parent.output,
                                   n_resamples=bootstrap_resamples)
        evaluated.set_display_name(f"evaluate-{arm}")
        arms[arm] = (trained, evaluated)
    compared = compare_models(task="classification",
                              arms=[f"real={arms['real'][1].outputs['Output']}",
                                    f"real_gan={arms['real_gan'][1].outputs['Output']}"],
                              split=test_split, metric=compare_metric,
                              n_resamples=bootstrap_resamples, parent_run_id=parent.output)
    finished = finish_pipeline_run(parent_run_id=parent.output).after(compared)
    place_steps({"tracking": parent, "data": data, "validate": checked, "train": gan,
                 "register": registered, "synthesize": generated, "finish": finished,
                 "compare": compared})
    for trained, evaluated in arms.values():  # the classifiers train and score on GPUs too
        place_steps({"train": trained, "evaluate": evaluated})
    return GanAugmentationOutputs(parent_run_id=parent.output,
                                  gan_version=registered.outputs["version"],
                                  synthetic_manifest=generated.output,
                                  comparison=compared.output)


def build_gan_augmentation_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-gan-augmentation",
                        description="Train a class-conditional StyleGAN2-ADA, generate, and "
                        "measure the classifier with and without its images.")(
        gan_augmentation_pipeline)
