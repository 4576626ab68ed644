"""The ``dermml`` command: every stage callable from the shell."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="DermML: dermatology imaging MLOps (data, validate, synth3d, train, tune, "
                  "evaluate, registry, serve, serving, lineage, pipeline, demo).",
                  no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: procedural demo data, importers, info.",
                       no_args_is_help=True)
registry_app = typer.Typer(help="Model registry: register, promote, rollback, history.",
                           no_args_is_help=True)
pipeline_app = typer.Typer(help="KFP pipelines: run locally, compile to YAML.",
                           no_args_is_help=True)
serving_app = typer.Typer(help="KServe serving that follows the registry: rollout, status, sync, "
                          "storage-uri, manifest.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")
app.add_typer(serving_app, name="serving")
app.add_typer(pipeline_app, name="pipeline")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input (files, config, flags): reported in one line, not a traceback."""
    from dermml.errors import input_errors
    from dermml.orchestration.k8s import NoCluster

    return (*input_errors(), NoCluster, FileExistsError, FileNotFoundError, KeyError, ValueError)


def _is_mlflow_input_error(exc: BaseException) -> bool:
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    return (mlflow_exceptions is not None
            and isinstance(exc, mlflow_exceptions.MlflowException)
            and exc.get_http_status_code() in (400, 404))


def cli_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            if os.environ.get("DERMML_DEBUG"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.secho(f"error: {message}", fg="red", err=True)
            if type(exc) in (ValueError, KeyError):  # not one of ours: could be a bug
                typer.secho("(DERMML_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            if not _is_mlflow_input_error(exc):
                raise
            # Bad serving params, an unknown model or alias: MLflow's message says which.
            typer.secho(f"error: {exc.message}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


# ----------------------------------------------------------------------------- data
@data_app.command("demo")
@cli_errors
def data_demo(
    out: Annotated[str, typer.Option(help="Output folder or s3:// prefix (must not exist)")],
    n: Annotated[int, typer.Option(help="Number of samples")] = 200,
    size: Annotated[int, typer.Option(help="Image size in pixels")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes)")] = 0,
):
    """Procedural dermoscopy-like images with lesion/attribute masks and diagnosis labels."""
    from dermml.data.demo import generate_demo
    from dermml.data.manifest import manifest_info

    uri = generate_demo(out, n=n, size=size, seed=seed, progress=True)
    typer.echo(manifest_info(uri))


@data_app.command("import")
@cli_errors
def data_import(
    fmt: Annotated[str, typer.Argument(help="segmentation|classification|isic2018|ph2|coco")],
    src: Annotated[str, typer.Argument(help="Dataset folder (local or s3://)")],
    out: Annotated[str, typer.Option(help="Manifest to write (.parquet)")],
    seed: Annotated[int, typer.Option(help="Seed of assigned splits")] = 0,
    group: Annotated[str, typer.Option(
        help="What stays in one split: auto (patient_id, lesion_id where known, and "
             "near-duplicate images), near-duplicates, a column (patient_id, lesion_id; "
             "near-duplicates too), or none (row by row)")] = "auto",
    annotations: Annotated[str | None, typer.Option(help="COCO JSON file (coco)")] = None,
    metadata: Annotated[str | None, typer.Option(
        help="CSV with patient_id and/or lesion_id per image (keyed by sample_id, image_id, "
             "image, isic_id or image_name = file name without extension), e.g. "
             "HAM10000_metadata.csv")] = None,
):
    """Turn a public dataset layout into a manifest (images referenced, not copied)."""
    from dermml.data.importers import import_dataset
    from dermml.data.manifest import manifest_info

    options = {"annotations": annotations} if annotations else {}
    uri, _ = import_dataset(fmt, src, out, seed=seed, group=group, metadata=metadata,
                            progress=True, **options)
    typer.echo(manifest_info(uri))


@data_app.command("export")
@cli_errors
def data_export(
    fmt: Annotated[str, typer.Argument(help="Format: stylegan (StyleGAN2-ADA dataset ZIP)")],
    manifest: Annotated[str, typer.Argument(help="Manifest URI or dataset folder")],
    out: Annotated[str, typer.Option(help="ZIP file to write (never overwritten)")],
    label_column: Annotated[str, typer.Option(help="Column of the class ('' = unconditional)")]
        = "label",
    resolution: Annotated[int | None, typer.Option(
        help="Centre-crop and resize to this power of two (required for mixed sizes)")] = None,
    split: Annotated[str, typer.Option(help="Split(s) to export, comma-separated")] = "train",
):
    """Write a manifest in another tool's format (the reference StyleGAN2-ADA's dataset ZIP)."""
    if fmt != "stylegan":
        raise ValueError(f"unknown export format {fmt!r}; known formats: stylegan")
    from dermml.data.stylegan_zip import export_stylegan_zip

    summary = export_stylegan_zip(manifest, out, label_column=label_column,
                                  resolution=resolution, split=split, progress=True)
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("info")
@cli_errors
def data_info(manifest: Annotated[str, typer.Argument(help="Manifest URI or dataset folder")]):
    """Counts per split and label, and the dataset version."""
    from dermml.data.manifest import manifest_info

    typer.echo(manifest_info(manifest))


# ----------------------------------------------------------------------------- validate
@app.command("validate")
@cli_errors
def validate_cmd(
    manifest: Annotated[str, typer.Argument(help="Manifest URI or dataset folder")],
    suite: Annotated[str, typer.Option(help="Suite name (segmentation|classification|detection|"
                                            "attributes|synth3d) or a suite YAML/JSON file")] =
        "segmentation",
    report: Annotated[str | None, typer.Option(help="Folder for validation.json, facts.csv, "
                                                    "quarantine.csv, data_docs/, drift.png")]
        = None,
    warn_only: Annotated[bool, typer.Option(help="Report problems but exit 0")] = False,
    write_clean: Annotated[str | None, typer.Option(help="Write a manifest without quarantined "
                                                         "rows here")] = None,
    require_splits: Annotated[str, typer.Option(help="Comma-separated splits that must be "
                                                     "non-empty")] = "",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Suite threshold, rule.param=value (e.g. lesion_fraction.min=0.01)")]
        = None,
    drift_against: Annotated[str | None, typer.Option(help="Reference manifest to check "
                                                           "distribution drift against")] = None,
    processes: Annotated[int, typer.Option(help="Worker processes (0: one per CPU)")] = 0,
    track: Annotated[bool, typer.Option(help="Log the report to MLflow")] = True,
):
    """Check every image, mask and label against a suite; exit 1 naming each bad file."""
    from dermml.validation.run import ValidationFailed, validate

    splits = tuple(s for s in require_splits.split(",") if s)
    try:
        outcome = validate(manifest, suite, report, splits, warn_only, write_clean, track=track,
                           overrides=set_, drift_against=drift_against,
                           processes=processes or None)
    except ValidationFailed as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(outcome.report.summary())


# ----------------------------------------------------------------------------- synth3d
@app.command("synth3d")
@cli_errors
def synth3d_cmd(
    out: Annotated[str, typer.Option(help="Output folder or s3:// prefix (rerun to resume)")],
    lesions: Annotated[str | None, typer.Option(help="Segmentation manifest of the lesions to "
                                                     "paste (needs masks)")] = None,
    bodies: Annotated[str | None, typer.Option(
        help="Folder of meshes (3DBodyTex <id>/model_highres_0_normalized.obj, or any OBJ "
             "with a texture) or procedural:N")] = None,
    views: Annotated[int | None, typer.Option(help="Views per body")] = None,
    size: Annotated[int | None, typer.Option(help="View size in pixels")] = None,
    blend: Annotated[str | None, typer.Option(help="paste, poisson or deep")] = None,
    lesions_per_body: Annotated[int | None, typer.Option(help="Lesions pasted per body")]
        = None,
    backgrounds: Annotated[str | None, typer.Option(help="Folder of background images "
                                                         "(default: procedural rooms)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed: same seed, same views")] = None,
    config: Annotated[str | None, typer.Option(help="YAML settings (see docs/synth3d.md)")]
        = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Setting key=value, e.g. "
                                                   "blend.steps=100")] = None,
    ray: Annotated[bool, typer.Option(help="Run one Ray task per body (--no-ray: in this "
                                           "process)")] = True,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow")] = True,
    parent_run_id: Annotated[str | None, typer.Option(help="Parent MLflow run")] = None,
):
    """DermSynth3D: paste lesions into 3D body textures, blend them, render annotated views."""
    from dermml.synthesis.run import resolve_config, synthesize

    flags = {"lesions": lesions, "bodies.source": bodies, "views.per_body": views,
             "views.size": size, "blend.method": blend, "paste.lesions_per_body":
             lesions_per_body, "views.backgrounds": backgrounds, "seed": seed}
    sets = [*(set_ or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    cfg = resolve_config(config, sets)
    outcome = synthesize(cfg, out, use_ray=ray, parent_run_id=parent_run_id, track=track)
    typer.echo(json.dumps({"manifest": outcome.manifest_uri, "version": outcome.version,
                           "views": outcome.n_views, "run_id": outcome.run_id,
                           "counts": outcome.counts}, indent=2))


# ----------------------------------------------------------------------------- train
@app.command("train")
@cli_errors
def train_cmd(
    task: Annotated[str, typer.Argument(help="Task name, e.g. segmentation")],
    config: Annotated[str | None, typer.Option(help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, key=value")] = None,
    resume: Annotated[str | None, typer.Option(help="MLflow run id to resume (its logged "
                                                    "config is used unless --config is given)")]
        = None,
    parent_run_id: Annotated[str | None, typer.Option(help="Parent MLflow run")] = None,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation over train+val "
                                            "(patient-level when ids exist)")] = 0,
    wl_train: Annotated[str | None, typer.Option(help="Weak-label split (with --sl-train)")]
        = None,
    sl_train: Annotated[str | None, typer.Option(help="Strong-label split")] = None,
    repeats: Annotated[int, typer.Option(help="Weak-label relabel/train/fine-tune rounds")] = 1,
    pretrained: Annotated[str | None, typer.Option(
        help="Backbone/encoder weights: imagenet (published weights through the Hugging Face "
             "hub cache, HF_HOME; HF_HUB_OFFLINE=1 reads the cache only) or a local "
             ".pth/.pt/.safetensors file; the same as --set model.pretrained=...")] = None,
    platform: Annotated[str | None, typer.Option(
        help="Platform config (configs/platform/*.yaml): the workers must fit its pools, and "
             "with ray_job.enabled the training runs as a KubeRay RayJob; without it, "
             "training runs here")] = None,
    synthetic_per_class: Annotated[str | None, typer.Option(
        help="Mix GAN images into training: counts per class drawn from --generator, e.g. "
             "benign=100,melanoma=300 (through the mix: settings)")] = None,
    generator: Annotated[str, typer.Option(
        help="The generator of --synthetic-per-class")] = "models:/dermml-gan@champion",
):
    """Train a task (through Ray Train unless ray.enabled=false); prints run id and model URI.

    The console gets one line per epoch; everything else (Ray, MLflow) goes to
    $DERMML_HOME/logs/train-<time>/train.log, also logged to the run."""
    from dermml.orchestration.console import captured, new_log_dir
    from dermml.orchestration.ray_train import shutdown_ray
    from dermml.orchestration.tracking import ui_command
    from dermml.training.run import resolve_config, train

    if pretrained:
        set_ = [*(set_ or []), f"model.pretrained={pretrained}"]
    if platform and (folds or wl_train or sl_train):
        raise ValueError("--platform places a single training run; cross-validation and weak "
                         "labels train here (drop --platform, or --folds/--wl-train/--sl-train)")
    synthetic = ""
    if synthetic_per_class:
        from dermml.synthesis.gan import parse_per_class, synthetic_training_set

        synthetic = synthetic_training_set(generator, parse_per_class(synthetic_per_class))
    cfg = resolve_config(task, config, set_, resume_run_id=resume,
                         synthetic_manifest=synthetic)
    if (wl_train or sl_train) and not (wl_train and sl_train):
        raise ValueError("weak labels need both --wl-train SPLIT and --sl-train SPLIT")
    with captured("train", new_log_dir("train") / "train.log"):
        try:
            if folds:
                from dermml.training.schemes import cross_validate

                cv = cross_validate(task, cfg, folds, parent_run_id)
                result = {"run_id": cv.run_id, "folds": [o.run_id for o in cv.folds],
                          "mean": cv.mean, "std": cv.std}
            elif wl_train:
                from dermml.training.schemes import train_with_weak_labels

                wl = train_with_weak_labels(task, cfg, wl_train, sl_train, repeats,
                                            parent_run_id=parent_run_id)
                result = {"run_id": wl.run_id, "model_uri": wl.model_uri, "rounds": wl.rounds}
            else:
                placed = None
                if platform:
                    from dermml.orchestration.platform import load_platform

                    placed = load_platform(platform)
                outcome = train(task, cfg, parent_run_id=parent_run_id, resume_run_id=resume,
                                platform=placed)
                result = {"run_id": outcome.run_id, "model_uri": outcome.model_uri,
                          "metrics": outcome.metrics}
        finally:
            shutdown_ray()  # Ray's last forwarded worker lines land in the log, not later
    typer.echo(json.dumps(result, indent=2))
    typer.echo(f"MLflow UI: {ui_command()}")


# ----------------------------------------------------------------------------- tune
@app.command("tune")
@cli_errors
def tune_cmd(
    task: Annotated[str, typer.Argument(help="Task name, e.g. segmentation")],
    space: Annotated[str | None, typer.Option(
        help="Search space YAML: one `dotted.key: distribution` per line, keys as --set "
             "(train.lr: loguniform(1e-5, 1e-2); model.encoder: choice(\\[resnet18, resnet34]); "
             "loss.0.weight: uniform(0.5, 2); also quniform(a, b, q), randint(a, b))")] = None,
    config: Annotated[str | None, typer.Option(help="YAML task config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fixed override, key=value")]
        = None,
    search: Annotated[str, typer.Option(help="random|optuna|hyperopt")] = "random",
    scheduler: Annotated[str, typer.Option(help="asha (stop trailing trials early)|pbt "
                                                "(population-based training)|none")] = "asha",
    trials: Annotated[int, typer.Option(help="Trials in the search")] = 8,
    concurrent: Annotated[int, typer.Option(help="Trials at once")] = 2,
    gpus_per_trial: Annotated[float | None, typer.Option(
        help="GPUs per trial (0.5: two trials share one); default: the config's ray.use_gpu")]
        = None,
    metric: Annotated[str | None, typer.Option(help="Metric to optimise (default: "
                                                    "val_<the task's gate metric>)")] = None,
    mode: Annotated[str | None, typer.Option(help="max|min (default: the gate's)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the search algorithm and scheduler")] = 0,
    grace_period: Annotated[int, typer.Option(help="asha: epochs before a trial can stop")] = 1,
    reduction_factor: Annotated[float, typer.Option(help="asha: 1/N of trials go on per "
                                                         "rung")] = 2.0,
    perturbation_interval: Annotated[int, typer.Option(help="pbt: epochs between "
                                                            "perturbations")] = 1,
    name: Annotated[str | None, typer.Option(help="Search name (default: task + a hash of "
                                                  "config, data and search)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted search "
                                                          "this command started")] = False,
    register: Annotated[bool, typer.Option(help="Register the best model as challenger")]
        = True,
    parent_run_id: Annotated[str | None, typer.Option(help="Parent MLflow run")] = None,
    platform: Annotated[str | None, typer.Option(
        help="Platform config: trials must fit its pools; with ray_job.enabled the search "
             "runs as a KubeRay RayJob")] = None,
    run: Annotated[str | None, typer.Option(
        help="Run the search recorded in this parent MLflow run (a RayJob's entrypoint)")]
        = None,
):
    """Hyper-parameter search with Ray Tune: every trial is a normal training run (MLflow child
    run of the search's parent run); the best model is registered as challenger."""
    from dermml.orchestration.tracking import ui_command
    from dermml.tuning.run import resolve_search, tune, tune_in_run

    if run:
        outcome = tune_in_run(run)
    else:
        if not space:
            raise typer.BadParameter("--space FILE is required (or --run RUN_ID)")
        settings = {"search": search, "scheduler": scheduler, "trials": trials,
                    "concurrent": concurrent, "gpus_per_trial": gpus_per_trial,
                    "metric": metric or "", "mode": mode or "", "seed": seed,
                    "grace_period": grace_period, "reduction_factor": reduction_factor,
                    "perturbation_interval": perturbation_interval, "name": name or ""}
        cfg, spec = resolve_search(task, config, set_, space, **settings)
        placed = None
        if platform:
            from dermml.orchestration.platform import load_platform

            placed = load_platform(platform)
        outcome = tune(task, cfg, spec, resume=resume, parent_run_id=parent_run_id,
                       register=register, platform=placed)
    typer.echo(json.dumps({"run_id": outcome.run_id, "name": outcome.name,
                           "best_run_id": outcome.best_run_id, "metric": outcome.metric,
                           "best_metric": outcome.best_metric,
                           "best_values": outcome.best_values, "model_uri": outcome.model_uri,
                           "version": outcome.version}, indent=2, default=str))
    typer.echo(f"MLflow UI: {ui_command()}")


# ----------------------------------------------------------------------------- evaluate
@app.command("evaluate")
@cli_errors
def evaluate_cmd(
    model_uri: Annotated[str, typer.Argument(help="runs:/ID/model, models:/NAME@ALIAS, or a "
                                                  "task name for its champion")],
    data: Annotated[str, typer.Option(help="Manifest URI")],
    splits: Annotated[str, typer.Option(help="Comma-separated splits, e.g. "
                                             "sl_test,external_test; a+b scores splits a and "
                                             "b as one set (train+val+test: the whole "
                                             "manifest, e.g. an external dataset)")] = "test",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for CIs (0: none)")] = 1000,
    alpha: Annotated[float, typer.Option(help="CI level: 1 - alpha")] = 0.05,
    param: Annotated[list[str] | None, typer.Option("--param", help="Serving param k=v, e.g. "
                                                    "sampler=ddim (see the model's params)")]
        = None,
    compare: Annotated[list[str] | None, typer.Option(
        "--compare", help="Instead: evaluate once per serving-param set on the first split and "
                          "print one table with seconds/image, e.g. --compare sampler=ddpm "
                          "--compare sampler=ddim,steps=25 (repeat; k=v,k=v)")] = None,
    min_group_size: Annotated[int, typer.Option(
        help="Skin-tone groups with fewer test images are reported as 'too few' (count, no "
             "metrics)")] = 10,
    skin_type_column: Annotated[str | None, typer.Option(
        help="Manifest column of known skin types to stratify by too (default: the first of "
             "fitzpatrick, fitzpatrick_skin_type, fitzpatrick_scale, skin_type, skin_tone)")]
        = None,
):
    """Metrics with bootstrap confidence intervals on one or more splits, logged to MLflow
    (a GAN: FID, KID, precision and recall of its images against each split), and per
    skin-tone group (ITA of the healthy skin; the manifest's skin-type column)."""
    from dermml.config import parse_params
    from dermml.evaluation.run import compare_settings, evaluate
    from dermml.registry.gate import champion_uri, record_evaluation
    from dermml.tasks import get_task, task_names

    if model_uri in task_names():  # `dermml evaluate gan --data ...`: the champion
        model_uri = champion_uri(model_uri)

    if compare:
        base = parse_params(param or [])
        settings = [{**base, **parse_params([kv for kv in item.split(",") if kv])}
                    for item in compare]
        split = next(s for s in splits.split(",") if s)
        table = compare_settings(model_uri, data, settings, split)
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return
    result = evaluate(model_uri, data, [s for s in splits.split(",") if s],
                      n_resamples=resamples, alpha=alpha, params=parse_params(param or []),
                      min_group_size=min_group_size, skin_type=skin_type_column)
    record_evaluation(result)  # on a registered version: what the promotion gate compares
    typer.echo(result.table().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    by_group = result.group_table()
    if not by_group.empty:  # the gate metric per skin-tone group
        gate_metric = get_task(result.task).gate_metric
        shown = by_group[by_group["metric"] == gate_metric].drop(columns="metric")
        typer.echo(f"\n{gate_metric} by skin tone (too few: under {min_group_size} images):")
        typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}",
                                   na_rep="-"))
    typer.echo(f"MLflow run: {result.run_id}  dataset version: {result.dataset_version}")


# ----------------------------------------------------------------------------- predict
@app.command("predict")
@cli_errors
def predict_cmd(
    model_uri: Annotated[str, typer.Argument(
        help="runs:/ID/model, models:/NAME@ALIAS, or a task name for its champion "
             "(segdiff = models:/dermml-segdiff@champion)")],
    images: Annotated[list[str], typer.Argument(help="Image files or URIs")],
    out: Annotated[str, typer.Option(help="Folder for masks / label maps and predictions.csv")],
    param: Annotated[list[str] | None, typer.Option("--param", help="Serving param k=v")]
        = None,
    sampler: Annotated[str | None, typer.Option(
        help="Diffusion models: ddpm, ddim or dpm")] = None,
    steps: Annotated[int | None, typer.Option(help="Diffusion models: sampling steps")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Diffusion models: samples averaged")]
        = None,
):
    """Predict with a logged model; the same pyfunc and params as serving."""
    import base64

    from dermml import storage
    from dermml.config import parse_params
    from dermml.data.images import load_image
    from dermml.orchestration.tracking import load_python_model
    from dermml.registry.gate import champion_uri
    from dermml.serving.pyfunc import request_frame
    from dermml.tasks import task_names

    if model_uri in task_names():
        model_uri = champion_uri(model_uri)
    if storage.exists(storage.join(out, "predictions.csv")):
        raise FileExistsError(f"{out}/predictions.csv exists; choose another --out")
    params = parse_params(param or [])
    params.update({k: v for k, v in (("sampler", sampler), ("steps", steps),
                                     ("ensemble", ensemble)) if v is not None})
    model = load_python_model(model_uri)
    response = model.predict(None, request_frame([load_image(u) for u in images]), params)
    for column in ("mask", "label_map", "lesion_mask", "skin_mask", "anatomy", "depth"):
        if column in response:
            for uri, encoded in zip(images, response[column], strict=True):
                name = f"{uri.rstrip('/').split('/')[-1].rsplit('.', 1)[0]}_{column}.png"
                storage.write_bytes(storage.join(out, name), base64.b64decode(encoded))
            response = response.drop(columns=[column])
    response.insert(0, "image", images)
    storage.write_bytes(storage.join(out, "predictions.csv"), response.to_csv(index=False).encode())
    typer.echo(response.to_string(index=False))


# ----------------------------------------------------------------------------- gan
def _generator_uri(task: str, model_uri: str) -> str:
    """``gan`` is the only generator task; a bare ``gan`` model means its champion."""
    if task != "gan":
        raise ValueError(f"unknown generator task {task!r}: `dermml generate gan MODEL` (3D "
                         "synthesis is `dermml synth3d`)")
    if model_uri == "gan":
        from dermml.registry.gate import champion_uri

        return champion_uri("gan")
    return model_uri


@app.command("generate")
@cli_errors
def generate_cmd(
    task: Annotated[str, typer.Argument(help="Generator task: gan")],
    model_uri: Annotated[str, typer.Argument(help="models:/dermml-gan@champion, runs:/ID/model "
                                                  "or gan (its champion)")],
    out: Annotated[str, typer.Option(help="Output folder or s3:// prefix (images + manifest; "
                                          "rerun to resume)")],
    seeds: Annotated[str, typer.Option(help="Seeds, e.g. 0-99 or 1,5,9")] = "0-15",
    class_: Annotated[list[str] | None, typer.Option(
        "--class", help="Class to generate (repeat; default: every class)")] = None,
    per_class: Annotated[str | None, typer.Option(
        help="Instead of --seeds: counts per class, e.g. benign=100,melanoma=300")] = None,
    trunc: Annotated[float | None, typer.Option(help="Truncation psi (default: the model's)")]
        = None,
):
    """Images of a registered generator with their manifest (label, seed, truncation, model
    version); train on them with `--set mix.synthetic_manifest=OUT/manifest.parquet`."""
    from dermml.synthesis.gan import generate_dataset, parse_per_class, parse_seeds

    model_uri = _generator_uri(task, model_uri)
    outcome = generate_dataset(model_uri, out, seeds=parse_seeds(seeds), classes=class_,
                               per_class=parse_per_class(per_class) if per_class else None,
                               truncation=trunc)
    typer.echo(json.dumps({"manifest": outcome.manifest_uri, "version": outcome.version,
                           "images": outcome.n_images, "counts": outcome.counts}, indent=2))


@app.command("project")
@cli_errors
def project_cmd(
    task: Annotated[str, typer.Argument(help="Generator task: gan")],
    model_uri: Annotated[str, typer.Argument(help="Generator model URI (or gan: its champion)")],
    image: Annotated[str, typer.Argument(help="Image file or URI to project")],
    out: Annotated[str, typer.Option(help="Folder for projected.png, projected_w.npy, "
                                          "target.png, projection.json")],
    class_: Annotated[str | None, typer.Option("--class", help="Class to project into "
                                                                "(default: the first)")] = None,
    steps: Annotated[int, typer.Option(help="Optimisation steps (the reference: 1000)")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the W statistics and noise")] = 0,
):
    """Find the W of a real image (the reference's projector.py)."""
    from dermml.synthesis.gan import project_image

    summary = project_image(_generator_uri(task, model_uri), image, out, class_, steps, seed)
    typer.echo(json.dumps(summary, indent=2))


@app.command("style-mix")
@cli_errors
def style_mix_cmd(
    task: Annotated[str, typer.Argument(help="Generator task: gan")],
    model_uri: Annotated[str, typer.Argument(help="Generator model URI (or gan: its champion)")],
    out: Annotated[str, typer.Option(help="PNG file or URI of the grid")],
    rows: Annotated[str, typer.Option(help="Row seeds, e.g. 85,100,75")] = "0-3",
    cols: Annotated[str, typer.Option(help="Column seeds, e.g. 55,821")] = "4-7",
    class_: Annotated[str | None, typer.Option("--class", help="Class (default: the first)")]
        = None,
    styles: Annotated[str, typer.Option(help="Layers whose W comes from the column seed")]
        = "0-6",
    trunc: Annotated[float, typer.Option(help="Truncation psi")] = 1.0,
):
    """The style-mixing grid of the reference's style_mixing.py."""
    from dermml import storage
    from dermml.data.images import encode_png
    from dermml.synthesis.gan import parse_seeds, style_mixing_grid

    grid = style_mixing_grid(_generator_uri(task, model_uri), parse_seeds(rows),
                             parse_seeds(cols), class_, parse_seeds(styles), trunc)
    storage.write_bytes(out, encode_png(grid))
    typer.echo(out)


# ----------------------------------------------------------------------------- registry
@registry_app.command("register")
@cli_errors
def registry_register(
    model: Annotated[str, typer.Argument(help="Run id or model URI (runs:/ID/model)")],
    task: Annotated[str, typer.Option(help="Task name")] = "segmentation",
):
    """Register a run's model as dermml-<task> and alias it `challenger`."""
    from dermml.registry.gate import model_name, register

    uri = model if "://" in model or model.startswith(("runs:/", "models:/")) else \
        f"runs:/{model}/model"
    version = register(uri, task)
    typer.echo(f"registered {model_name(task)} version {version} (alias challenger)")


@registry_app.command("promote")
@cli_errors
def registry_promote(
    version: Annotated[str, typer.Argument(help="Model version to promote")],
    data: Annotated[str, typer.Option(help="Manifest of the gate's test set")],
    task: Annotated[str, typer.Option(help="Task name")] = "segmentation",
    split: Annotated[str, typer.Option(help="Test split of the gate")] = "test",
    metric: Annotated[str | None, typer.Option(help="Gate metric (default: the task's)")] = None,
    min_delta: Annotated[float, typer.Option(help="Required improvement over the champion")]
        = 0.0,
    min_per_group: Annotated[list[str] | None, typer.Option(
        "--min-per-group", help="Refuse when a skin-tone group (of at least the evaluation's "
                                "min group size) scores below METRIC=VALUE, e.g. --min-per-group "
                                "dice=0.7 (repeat for more metrics)")] = None,
    platform: Annotated[str | None, typer.Option(help="Platform config (its `serving` section: "
                                                      "KServe follows the champion)")] = None,
):
    """Promote to `champion` only if the gate passes against the current champion (and, with
    --min-per-group, every reported skin-tone group reaches the floor); with KServe serving
    (platform config `serving.kserve`) the new champion then starts as a canary."""
    from dermml.registry.gate import parse_floors, promote

    decision = promote(task, version, data, split, metric, min_delta,
                       min_per_group=parse_floors(min_per_group or []))
    typer.echo(json.dumps(decision.__dict__, indent=2))
    if not decision.promoted:
        typer.secho(f"refused: {decision.reason}", fg="yellow", err=True)
        raise typer.Exit(3)
    _follow_registry(task, platform, "promotion", decision.version)


@registry_app.command("rollback")
@cli_errors
def registry_rollback(
    task: Annotated[str, typer.Option(help="Task name")] = "segmentation",
    reason: Annotated[str, typer.Option(help="Why")] = "manual rollback",
    platform: Annotated[str | None, typer.Option(help="Platform config (its `serving` section: "
                                                      "KServe follows the champion)")] = None,
):
    """Give `champion` back to the version the current champion replaced; with KServe serving
    the InferenceServices get its storageUri back too."""
    from dermml.registry.gate import rollback

    version = rollback(task, reason)
    typer.echo(f"champion is now version {version}")
    _follow_registry(task, platform, "rollback", version, reason)


def _follow_registry(task: str, platform: str | None, event: str, version: str,
                     reason: str = "") -> None:
    """After the champion moved: the InferenceServices that serve it follow (KServe serving,
    ``serving.kserve`` of the platform config); without a cluster, say how to catch up."""
    from dermml.orchestration import kserve
    from dermml.orchestration.k8s import NoCluster
    from dermml.orchestration.platform import load_platform

    serving = load_platform(platform).serving
    if not serving.kserve:
        return
    try:
        if event == "promotion":
            changes = kserve.follow_promotion(task, version, serving)
        else:
            changes = kserve.follow_rollback(task, serving, reason=f"registry rollback: {reason}")
    except NoCluster as error:
        typer.secho(f"InferenceServices not updated ({error}); where a kube context is, run: "
                    f"dermml serving {'rollout' if event == 'promotion' else 'sync'} "
                    f"--task {task}", fg="yellow", err=True)
        return
    typer.echo(kserve.describe(changes))
    if any(c.action == "canary" for c in changes):
        typer.echo(f"judge the canary: dermml serving rollout --task {task}")


@registry_app.command("history")
@cli_errors
def registry_history(task: Annotated[str, typer.Option(help="Task name")] = "segmentation"):
    """Versions, aliases and gate decisions (the audit trail)."""
    from dermml.registry.gate import history

    typer.echo(json.dumps(history(task), indent=2))


# ----------------------------------------------------------------------------- serve
@app.command("serve")
@cli_errors
def serve_cmd(
    model_uri: Annotated[str, typer.Argument(help="e.g. models:/dermml-segmentation@champion")],
    port: Annotated[int, typer.Option(help="Port (HTTP)")] = 5001,
    host: Annotated[str, typer.Option(help="Interface")] = "127.0.0.1",
    protocol: Annotated[str, typer.Option(
        help="mlflow: `mlflow models serve` (POST /invocations); v2: MLServer, the Open "
             "Inference Protocol (POST /v2/models/NAME/infer)")] = "mlflow",
    workers: Annotated[int, typer.Option(
        help="Server processes (mlflow) / MLServer parallel inference workers (v2)")] = 1,
    workdir: Annotated[str | None, typer.Option(
        help="v2: folder for MLServer's settings and the downloaded model "
             "(default $DERMML_HOME/serving/NAME-VERSION)")] = None,
):
    """Serve a model over HTTP; a registry alias is resolved once, and responses name the
    model and version served (docs/serving.md)."""
    import os

    from dermml.serving.server import launch, prepare

    served, workdir, model_path = prepare(model_uri, protocol, workdir)
    spec = launch(served, protocol, port, host, workers, workdir, model_path)
    identity = f"{served.name} version {served.version}" if served.version else "unregistered"
    where = (f"{spec.url}/v2/models/{served.v2_name}/infer (MLServer settings in {spec.cwd})"
             if protocol == "v2" else f"{spec.url}/invocations")
    typer.echo(f"serving {served.uri} ({identity}) over {protocol} at {where}", err=True)
    if spec.cwd:
        os.chdir(spec.cwd)
    os.execve(spec.command[0], spec.command, spec.env)


# ----------------------------------------------------------------------------- serving (KServe)
TaskOpt = Annotated[str, typer.Option(help="Task name (registered model dermml-<task>)")]
ServingPlatformOpt = Annotated[str | None, typer.Option(
    help="Platform config (its `serving` section: namespace, canary, analysis); default "
         "$DERMML_PLATFORM or configs/platform/default.yaml")]


def _serving_config(platform: str | None):
    from dermml.orchestration.platform import load_platform

    return load_platform(platform).serving


@serving_app.command("rollout")
@cli_errors
def serving_rollout(task: TaskOpt = "segmentation", platform: ServingPlatformOpt = None):
    """Judge the canary of the champion (readiness, error rate, p95 latency) and roll it out,
    or roll it back (previous storageUri, `champion` moved back). Exit 1 after a rollback."""
    from dermml.orchestration import kserve

    try:
        changes = kserve.rollout(task, _serving_config(platform))
    except kserve.CanaryRolledBack as failed:
        typer.echo(kserve.describe(failed.changes))
        typer.secho(f"rolled back: {failed}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(kserve.describe(changes))


@serving_app.command("sync")
@cli_errors
def serving_sync(task: TaskOpt = "segmentation", platform: ServingPlatformOpt = None):
    """Point the InferenceServices at the champion now, without a canary (after a registry
    change made without a cluster)."""
    from dermml.orchestration import kserve

    typer.echo(kserve.describe(kserve.follow_rollback(task, _serving_config(platform),
                                                      reason="sync with the registry")))


@serving_app.command("status")
@cli_errors
def serving_status(task: TaskOpt = "segmentation", platform: ServingPlatformOpt = None):
    """What serves dermml-<task>: version, storageUri, rollout state, revisions, traffic."""
    from dermml.orchestration import kserve
    from dermml.registry.gate import model_name

    serving = _serving_config(platform)
    typer.echo(json.dumps(kserve.status(model_name(task), serving.namespace), indent=2))


@serving_app.command("storage-uri")
@cli_errors
def serving_storage_uri(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    platform: ServingPlatformOpt = None,
):
    """The storageUri KServe downloads a registered version from (the chart's
    serving.models[].storageUri at the first install)."""
    from dermml.orchestration import kserve
    from dermml.registry.gate import parse_model_uri

    ref = parse_model_uri(model_uri)
    if ref is None:
        raise ValueError(f"{model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    typer.echo(kserve.storage_uri(ref[0], ref[1], _serving_config(platform)))


@serving_app.command("manifest")
@cli_errors
def serving_manifest(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS the service follows")],
    name: Annotated[str, typer.Option(help="InferenceService name")] = "",
    runtime: Annotated[str, typer.Option(help="ServingRuntime name")] = "dermml-mlserver",
    deployment_mode: Annotated[str, typer.Option(help="Knative or Standard")] = "Knative",
    platform: ServingPlatformOpt = None,
):
    """The ServingRuntime and InferenceService (YAML) for MODEL_URI's current version, as
    charts/dermml renders them with serving.mode=kserve (kubectl apply -f - without Helm)."""
    import yaml

    from dermml.orchestration import kserve
    from dermml.orchestration.platform import load_platform
    from dermml.registry.gate import version_of

    config = load_platform(platform)
    registered, alias = kserve.parse_alias_uri(model_uri)
    version = version_of(registered, alias)
    objects = [
        kserve.serving_runtime(kserve.RuntimeSpec(runtime, config.serving.namespace,
                                                  config.image("cpu", "the serving runtime"))),
        kserve.inference_service(kserve.ServedModel(
            name or registered, config.serving.namespace, model_uri,
            kserve.storage_uri(registered, version, config.serving), version, runtime,
            deployment_mode=deployment_mode))]
    typer.echo(yaml.safe_dump_all(objects, sort_keys=False).rstrip())


# ----------------------------------------------------------------------------- lineage
@app.command("lineage")
@cli_errors
def lineage_cmd(
    ref: Annotated[str, typer.Argument(help="NAME@ALIAS, e.g. dermml-segmentation@champion")],
    platform: ServingPlatformOpt = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace of the InferenceServices "
                                                       "(default: the platform's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
):
    """Dataset version -> validation report -> training run -> evaluation -> registry version
    -> alias history -> the InferenceService revision serving it ("no cluster" without a kube
    context)."""
    from dermml.orchestration.lineage import lineage, render

    serving = _serving_config(platform)
    if namespace:
        serving = serving.model_copy(update={"namespace": namespace})
    info = lineage(ref, serving)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))


# ----------------------------------------------------------------------------- pipeline
@pipeline_app.command("run")
@cli_errors
def pipeline_run(
    name: Annotated[str, typer.Argument(help="Pipeline name, e.g. training")],
    local: Annotated[bool, typer.Option("--local", help="Run with kfp.local (SubprocessRunner)")]
        = False,
    param: Annotated[list[str] | None, typer.Option("--param", help="Pipeline parameter "
                                                                      "key=value")] = None,
):
    """Run a pipeline; `--local` executes every component here, against the same MLflow."""
    from dermml.config import parse_params
    from dermml.orchestration.kfp_local import PipelineFailed, run_local
    from pipelines import get_pipeline

    if not local:
        typer.secho("`pipeline run` executes locally (--local); to run on a cluster use "
                    "`dermml pipeline submit NAME --host URL`", fg="red", err=True)
        raise typer.Exit(2)
    try:  # the console gets a line per stage and epoch; logs go to $DERMML_HOME/logs
        outputs = run_local(get_pipeline(name), parse_params(param or []))
    except PipelineFailed as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(outputs, indent=2, default=str))


@pipeline_app.command("compile")
@cli_errors
def pipeline_compile(
    name: Annotated[str, typer.Argument(help="Pipeline name, e.g. training")],
    out: Annotated[Path, typer.Option(help="Output YAML file")],
    platform: Annotated[str | None, typer.Option(help="Platform config (images, pools, "
                                                      "secrets, env, RayJob); default "
                                                      "configs/platform/default.yaml")]
        = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Pipeline parameter k=v, compiled in as its default (e.g. task=segdiff "
                        "config=configs/segdiff/ph2.yaml); training must fit the platform")]
        = None,
):
    """Write the KFP IR YAML of a pipeline, with Kubernetes placement from the platform config."""
    from dermml.config import parse_params
    from dermml.orchestration.kfp_local import compile_pipeline
    from pipelines import get_pipeline

    compile_pipeline(get_pipeline(name), str(out), platform, parse_params(param or []))
    typer.echo(f"wrote {out}")


def _target(host, experiment, namespace, service_account, pipeline_root, platform):
    from dermml.orchestration.kfp_client import Target

    return Target(host=host, experiment=experiment, namespace=namespace,
                  service_account=service_account, pipeline_root=pipeline_root,
                  platform=platform)


HostOpt = Annotated[str, typer.Option(help="KFP API URL, e.g. http://ml-pipeline-ui.kubeflow")]
ExperimentOpt = Annotated[str, typer.Option(help="KFP experiment")]
NamespaceOpt = Annotated[str, typer.Option(help="Kubernetes namespace of the run")]
SaOpt = Annotated[str, typer.Option(help="Service account the pipeline pods run as")]
RootOpt = Annotated[str | None, typer.Option(help="Pipeline root, e.g. s3://bucket/kfp")]
PlatformOpt = Annotated[str | None, typer.Option(help="Platform config (images, pools, secrets, "
                                                       "env, RayJob)")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="Pipeline parameter k=v")]


@pipeline_app.command("submit")
@cli_errors
def pipeline_submit(
    name: Annotated[str, typer.Argument(help="Pipeline name, e.g. training")],
    host: HostOpt, experiment: ExperimentOpt = "dermml", namespace: NamespaceOpt = "kubeflow",
    service_account: SaOpt = "pipeline-runner", pipeline_root: RootOpt = None,
    platform: PlatformOpt = None, param: ParamOpt = None,
):
    """Upload the pipeline to a KFP instance and start a run."""
    from dermml.config import parse_params
    from dermml.orchestration.kfp_client import submit
    from pipelines import get_pipeline

    target = _target(host, experiment, namespace, service_account, pipeline_root, platform)
    typer.echo(json.dumps(submit(get_pipeline(name), target, parse_params(param or [])),
                          indent=2))


@pipeline_app.command("schedule")
@cli_errors
def pipeline_schedule(
    name: Annotated[str, typer.Argument(help="Pipeline name, e.g. training")],
    host: HostOpt,
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * 1' (5 or 6 fields)")],
    experiment: ExperimentOpt = "dermml", namespace: NamespaceOpt = "kubeflow",
    service_account: SaOpt = "pipeline-runner", pipeline_root: RootOpt = None,
    platform: PlatformOpt = None, param: ParamOpt = None,
    max_concurrency: Annotated[int, typer.Option(help="Concurrent runs at most")] = 1,
):
    """Create a recurring run (cron) of the pipeline on a KFP instance."""
    from dermml.config import parse_params
    from dermml.orchestration.kfp_client import schedule
    from pipelines import get_pipeline

    target = _target(host, experiment, namespace, service_account, pipeline_root, platform)
    result = schedule(get_pipeline(name), target, parse_params(param or []), cron,
                      max_concurrency=max_concurrency)
    typer.echo(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- demo
@app.command("demo")
@cli_errors
def demo_cmd(
    n: Annotated[int, typer.Option(help="Demo samples")] = 200,
    size: Annotated[int, typer.Option(help="Image size")] = 64,
    epochs: Annotated[int, typer.Option(help="Training epochs")] = 20,
    port: Annotated[int, typer.Option(help="Port for the model server")] = 5055,
):
    """The whole job end to end on embedded defaults, then one real HTTP prediction."""
    from dermml.orchestration.kfp_local import PipelineFailed
    from dermml.quickstart import run_demo
    from pipelines import get_pipeline

    try:
        run_demo(get_pipeline("training"), n=n, size=size, epochs=epochs, port=port)
    except PipelineFailed as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    app(prog_name="dermml")


if __name__ == "__main__":
    sys.exit(main())
