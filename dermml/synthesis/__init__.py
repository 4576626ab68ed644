"""The synth3d stage: DermSynth3D-style synthesis run in parallel with Ray, tracked in MLflow."""
