"""3D synthesis of annotated skin images (DermSynth3D): bodies, lesion placement, blending,
rendering and views. The core: torch, numpy, PIL, trimesh / xatlas / embreex / manifold3d
only; the stage that runs it with Ray and MLflow is ``dermml.synthesis``."""
