"""Container images: no Docker here, so check that Dockerfiles, lock file and code agree."""

import re
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "components" / "Dockerfile", ROOT / "components" / "Dockerfile.gpu"]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version.split(";")[0].strip()
    return pins


def args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), re.M))


def test_every_pyproject_dependency_is_pinned_in_the_lock():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = lock()
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", dep)[0].lower())
        assert name in pins, f"{dep} is not pinned in requirements/lock.txt (run make lock)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_lock_file_and_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    assert "COPY requirements/lock.txt requirements/lock.txt" in text
    assert "requirements/lock.txt" in text.split("COPY requirements/lock.txt", 1)[1]
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == "10001"
    for image in re.findall(r"^FROM (\S+)", text, re.M):
        assert ":" in image and not image.endswith(":latest"), image
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image}: pin an exact patch release"
    # Dependencies are installed before the code is copied, so code edits keep the pip layer.
    assert text.index("requirements/lock.txt") < text.index("COPY dermml ./dermml")
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"


def test_torch_versions_in_images_match_the_lock():
    pins = lock()
    cpu, gpu = args(DOCKERFILES[0]), args(DOCKERFILES[1])
    assert cpu["TORCH_VERSION"] == pins["torch"] == gpu["TORCH_VERSION"]
    assert cpu["TORCHVISION_VERSION"] == pins["torchvision"]


def test_cpu_image_filter_drops_exactly_the_cuda_wheels():
    text = DOCKERFILES[0].read_text()
    pattern = re.search(r"grep -vE '([^']+)'", text).group(1)
    lines = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    kept = [line for line in lines if not re.match(pattern, line)]
    assert not [line for line in kept if re.match(r"(nvidia-|cuda-|triton|torch=)", line)]
    assert len(lines) - len(kept) == sum(
        1 for line in lines if re.match(r"(torch|torchvision|triton|nvidia-|cuda-)", line))


def test_gpu_image_builds_pytorch3d_from_source_with_cuda():
    text = DOCKERFILES[1].read_text()
    assert "FORCE_CUDA=1" in text and "facebookresearch/pytorch3d" in text
    assert re.search(r"PYTORCH3D_VERSION=v\d+\.\d+\.\d+", text)
    assert "9.0" in args(DOCKERFILES[1])["TORCH_CUDA_ARCH_LIST"]  # Hopper


def test_gpu_image_builds_pytorch3d_on_the_runtime_os_and_pins_its_dependencies():
    """A wheel compiled on a newer glibc than the runtime's does not import; unpinned or
    missing runtime dependencies break ``import pytorch3d`` only in the image."""
    text = DOCKERFILES[1].read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) == 2 and len({b.split(":")[1].rsplit("-", 1)[-1] for b in bases}) == 1, \
        f"build and runtime stages on different OS releases: {bases}"
    extra = (ROOT / "requirements" / "pytorch3d.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in extra if line and not line.startswith("#"))
    assert {"iopath", "fvcore", "portalocker"} <= set(pins)
    assert not set(pins) & set(lock()), "pinned twice"
    for command in re.findall(r"pip install ([^&\n]+)", text):
        for word in command.replace("\\", " ").split():
            if re.match(r"^[A-Za-z][\w.-]*$", word) and word not in ("wheel", "setuptools",
                                                                    "ninja"):
                raise AssertionError(f"unpinned package in a pip install: {word}")
    assert "pip check" in text


def test_platform_images_match_the_make_images_tags():
    from dermml.orchestration.platform import load_platform

    for name in ("default.yaml", "local.yaml"):
        images = load_platform(ROOT / "configs" / "platform" / name).images
        assert images == load_platform(ROOT / "configs" / "platform" / "default.yaml").images
    CPU_IMAGE, GPU_IMAGE = images["cpu"], images["gpu"]  # noqa: N806

    out = subprocess.run(["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"-t {CPU_IMAGE} " in out.replace("\\\n", " ").replace("\t", "") + " "
    assert CPU_IMAGE.endswith(f":{version}") and GPU_IMAGE.endswith(f":{version}")
    assert "Dockerfile.gpu" in out and GPU_IMAGE in out


def test_masks_are_binarised_one_way_and_non_masks_are_told_apart(tmp_path):
    from dermml.data.images import binarize_mask, load_mask, mask_encoding

    lesion = np.zeros((20, 30), bool)
    lesion[5:15, 10:20] = True
    zero_one = lesion.astype(np.uint8)  # a mask coded 0/1 (common in research code)
    Image.fromarray(zero_one).save(tmp_path / "m01.png")
    assert (load_mask(str(tmp_path / "m01.png")) == lesion).all()
    rgb = np.stack([lesion.astype(np.uint8) * 255] * 3, axis=-1)  # PH2's RGB black/white mask
    assert mask_encoding(rgb) == ("binary", "")
    assert mask_encoding(zero_one) == ("binary_0_1", "")
    soft = lesion.astype(np.uint8) * 255
    soft[5, 10:20] = 128  # an anti-aliased edge row
    assert mask_encoding(soft)[0] == "soft" and (binarize_mask(soft) == lesion).all()
    photo = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    kind, why = mask_encoding(photo)
    assert kind == "not_a_mask" and "colour image" in why
    grey_photo = np.random.default_rng(0).integers(40, 200, (20, 30), dtype=np.uint8)
    kind, why = mask_encoding(grey_photo)
    assert kind == "not_a_mask" and "mid-grey" in why
