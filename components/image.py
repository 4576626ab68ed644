"""The image flavour each component needs. The platform config names the image of each flavour
(``images`` in configs/platform/*.yaml); ``dermml.orchestration.k8s.place`` puts it on the step
when a pipeline is built."""

from dermml.orchestration.platform import image_flavour

CPU_IMAGE = image_flavour("cpu")
"""Slim image: data, validation, tracking, registration."""
GPU_IMAGE = image_flavour("gpu")
"""CUDA torch and pytorch3d: training, scoring (evaluate, promote), synthesis."""
