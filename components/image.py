"""Container images of the components; override at compile time with $DERMML_IMAGE(_GPU)."""

import os

CPU_IMAGE = os.environ.get("DERMML_IMAGE", "ghcr.io/dermml/dermml:0.1.0")
GPU_IMAGE = os.environ.get("DERMML_IMAGE_GPU", "ghcr.io/dermml/dermml-gpu:0.1.0")
