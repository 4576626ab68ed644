"""``dermml demo``: the main job end to end on embedded defaults, ending in a real HTTP call.

demo data -> validation -> Ray Train -> evaluation -> registration -> gated promotion (KFP local
pipeline) -> ``mlflow models serve`` of the champion -> one prediction -> Dice against the truth.
"""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
from PIL import Image

from dermml.config import dermml_home, shipped_config
from dermml.data.images import load_image, load_mask
from dermml.data.manifest import read_manifest
from dermml.data.run import demo_dataset_uri
from dermml.metrics.segmentation import segmentation_scores
from dermml.orchestration import tracking
from dermml.orchestration.console import new_log_dir
from dermml.orchestration.kfp_local import PipelineDef, run_local

CHAMPION_URI = "models:/dermml-segmentation@champion"


def run_demo(pipeline: PipelineDef, n: int = 200, size: int = 64, epochs: int = 20,
             seed: int = 0, port: int = 5055) -> float:
    """Run the demo with the training ``pipeline`` (the CLI hands it over, from
    ``pipelines.PIPELINES``); returns the Dice of the served prediction. It prints a line per
    step, stage and epoch; the stage and server logs go to ``$DERMML_HOME/logs/demo-<time>``."""
    from dermml.serving.server import predict_http, serve_model, stop_server

    logs = new_log_dir("demo")
    print(f"[1/3] training pipeline with DERMML_HOME={dermml_home()}", flush=True)
    demo_config = shipped_config("segmentation", "demo.yaml")
    config = str(demo_config) if demo_config else ""
    outputs = run_local(pipeline, {"demo_n": n, "demo_size": size, "seed": seed,
                                   "config": config,
                                   "overrides": [f"train.epochs={epochs}",
                                                 f"data.image_size={size}"]},
                        console=sys.stdout, log_dir=logs)
    print(f"pipeline outputs: {outputs}", flush=True)
    manifest = read_manifest(demo_dataset_uri(str(dermml_home() / "data"), n, size, seed))
    sample = manifest.split("test").iloc[0]
    image = load_image(manifest.resolve(sample["image_uri"]))
    truth = load_mask(manifest.resolve(sample["mask_uri"]))

    log_file = logs / "serve.log"
    print(f"[2/3] serving {CHAMPION_URI} (log: {log_file})", flush=True)
    server, url = serve_model(CHAMPION_URI, str(log_file), port=port)
    try:
        print(f"      answering at {url}", flush=True)
        response = predict_http(url, [image])
    finally:
        stop_server(server)
    mask_png = base64.b64decode(response.loc[0, "mask"])
    predicted = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L")) > 127
    dice = segmentation_scores(predicted, truth)["dice"]
    print(f"[3/3] POST {url}/invocations with test image {sample['sample_id']}: "
          f"Dice vs ground truth = {dice:.3f}")
    print(f"MLflow UI on these runs: {tracking.ui_command()}", flush=True)
    return dice
