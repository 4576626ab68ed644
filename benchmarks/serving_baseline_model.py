"""The plain baseline of ``benchmarks/serving.py`` (an MLflow "model from code").

The same network as the DermML model (the whole torch module, pickled), the same request
(base64 PNG in an ``image`` column) and the same response columns, with nothing of DermML's
serving layer: no param or size checks, no post-processing beyond the 0.5 threshold, no
refusals (a bad image fails as it fails), no identity columns.
"""

import base64
import io

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from PIL import Image

SIZE_ARTIFACT = "image_size"


class PlainSegmenter(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.module = torch.load(context.artifacts["module"], map_location="cpu",
                                 weights_only=False).eval()
        with open(context.artifacts[SIZE_ARTIFACT]) as handle:
            self.size = int(handle.read())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for value in model_input["image"]:
            image = Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB")
            width, height = image.size
            x = torch.from_numpy(np.asarray(image.resize((self.size, self.size),
                                                         Image.BILINEAR)).copy())
            x = x.permute(2, 0, 1).float().div_(255.0)[None]
            with torch.no_grad():  # as DermML's task predicts
                prob = torch.sigmoid(self.module(x).float())
                prob = torch.nn.functional.interpolate(prob, size=(height, width),
                                                       mode="bilinear", align_corners=False)
            mask = (prob[0, 0].numpy() > 0.5)
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
            rows.append({"mask": base64.b64encode(buf.getvalue()).decode("ascii"),
                         "lesion_fraction": float(mask.mean()), "height": height,
                         "width": width})
        return pd.DataFrame(rows)


set_model(PlainSegmenter())
