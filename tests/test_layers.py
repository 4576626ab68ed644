"""The core (models, losses, data, metrics, training loop, synth3d) imports no orchestration
library."""

import subprocess
import sys

CORE = ["dermml.models.unet", "dermml.losses.segmentation", "dermml.metrics.segmentation",
        "dermml.data.manifest", "dermml.data.datasets", "dermml.data.demo",
        "dermml.data.importers", "dermml.data.splits", "dermml.training.loop",
        "dermml.tasks", "dermml.synth3d.generate", "dermml.synth3d.blend",
        "dermml.synth3d.views", "dermml.synth3d.raster", "dermml.synth3d.features"]
FORBIDDEN = ["ray", "mlflow", "kfp", "kubernetes", "great_expectations"]


def test_core_modules_import_no_orchestration_library():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout.strip()}"
