"""Container images: no Docker here, so check that Dockerfiles, lock files and code agree.

The images install requirements/lock-runtime.txt, the runtime closure of requirements/base.in;
requirements/lock.txt adds the dev tools (requirements/dev.in) for ``make install``.
"""

import re
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "components" / "Dockerfile", ROOT / "components" / "Dockerfile.gpu"]
REQUIREMENTS = ROOT / "requirements"
RUNTIME_LOCK = "requirements/lock-runtime.txt"
# What pip's own installation brings and `pip freeze` leaves out.
PIP_TOOLS = {"pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def lock(path: str = "requirements/lock.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.split(";")[0].strip()
    return pins


def requirement_names(path: Path) -> set[str]:
    """Canonical names of a requirements file (``name[extra]==1 ; marker  # comment``)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonical(re.split(r"[<>=!~\[ ;@]", line, maxsplit=1)[0]))
    return names


def final_stage(dockerfile: Path) -> str:
    """The Dockerfile from its last FROM on: what ends up in the image."""
    text = dockerfile.read_text()
    return text[[m.start() for m in re.finditer(r"^FROM ", text, re.M)][-1]:]


def installed_requirement_files(stage: str) -> set[str]:
    """Repository paths of the requirement files that ``pip install -r`` installs in a stage,
    following a file derived with ``grep ... requirements/X > /tmp/Y`` back to X."""
    derived = dict((m.group(2), m.group(1)) for m in re.finditer(
        r"grep [^\n>]*?(requirements/\S+) > (\S+)", stage))
    files = set()
    for path in re.findall(r"pip install [^\n]*?-r (\S+)", stage.replace("\\\n", " ")):
        files.add(derived.get(path, path))
    return files


def runtime_closure() -> dict[str, str]:
    """Every distribution the requirements of base.in need at run time (extras included), as
    installed here: name -> the requirement that pulled it in."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    roots = [Requirement(line.split("#", 1)[0].strip())
             for line in (REQUIREMENTS / "base.in").read_text().splitlines()
             if line.split("#", 1)[0].strip()]
    needed: dict[str, set[str]] = {}
    via: dict[str, str] = {}
    stack = [(r, "base.in") for r in roots]
    while stack:
        req, parent = stack.pop()
        name, extras = canonical(req.name), set(req.extras)
        if name in needed and extras <= needed[name]:
            continue
        needed.setdefault(name, set()).update(extras)
        via.setdefault(name, parent)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError as error:
            raise AssertionError(
                f"{req.name} (needed by {parent}) is not installed: make install") from error
        for text in dist.requires or []:
            dep = Requirement(text)
            envs = [{"extra": extra} for extra in ["", *sorted(needed[name])]]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                stack.append((dep, name))
    return via


def args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), re.M))


def test_every_pyproject_dependency_is_pinned_in_the_lock():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = lock()
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", dep)[0].lower())
        assert name in pins, f"{dep} is not pinned in requirements/lock.txt (run make lock)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_runtime_lock_and_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    assert f"COPY {RUNTIME_LOCK} {RUNTIME_LOCK}" in text
    assert RUNTIME_LOCK in text.split(f"COPY {RUNTIME_LOCK}", 1)[1]
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "requirements/lock.txt" not in code and "dev.in" not in code
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == "10001"
    # Dependencies are installed before the code is copied, so code edits keep the pip layer.
    assert text.index(RUNTIME_LOCK) < text.index("COPY dermml ./dermml")
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"


def test_base_images_are_pinned_by_one_digest_with_a_refresh_recipe():
    """A tag can be re-pushed; a digest cannot. Every FROM (both stages of the GPU image too)
    names an exact patch release and the same index digest, and the Dockerfile says how to
    refresh it."""
    bases = [image for dockerfile in DOCKERFILES
             for image in re.findall(r"^FROM (\S+)", dockerfile.read_text(), re.M)]
    assert len(bases) == 3, bases
    for image in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", image), (
            f"{image}: pin an exact patch release by digest")
    assert len(set(bases)) == 1, f"the images start from different bases: {set(bases)}"
    assert "docker buildx imagetools inspect" in DOCKERFILES[0].read_text()


def test_torch_versions_in_images_match_the_lock():
    pins = lock()
    cpu, gpu = args(DOCKERFILES[0]), args(DOCKERFILES[1])
    assert cpu["TORCH_VERSION"] == pins["torch"] == gpu["TORCH_VERSION"]
    assert cpu["TORCHVISION_VERSION"] == pins["torchvision"]


def test_cpu_image_filter_drops_exactly_the_cuda_wheels():
    text = DOCKERFILES[0].read_text()
    pattern = re.search(r"grep -vE '([^']+)'", text).group(1)
    lines = (ROOT / RUNTIME_LOCK).read_text().splitlines()
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
    releases = {b.split("@")[0].split(":")[1].rsplit("-", 1)[-1] for b in bases}
    assert len(bases) == 2 and len(releases) == 1, \
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


def test_the_runtime_lock_is_the_runtime_part_of_the_dev_lock():
    """Same pins in both files; the runtime lock holds every distribution base.in needs at run
    time and nothing that only the dev tools need."""
    runtime, full = lock(RUNTIME_LOCK), lock()
    assert {name: full.get(name) for name in runtime} == runtime, "pins differ: run make lock"
    needed = runtime_closure()
    missing = sorted(f"{name} (via {via})" for name, via in needed.items()
                     if name not in runtime and name not in PIP_TOOLS)
    assert not missing, f"{RUNTIME_LOCK} lacks runtime dependencies: {missing}"
    extra = sorted(set(runtime) - set(needed))
    assert not extra, f"{RUNTIME_LOCK} holds what base.in does not need: {extra}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_no_dev_package(dockerfile):
    """pytest, moto, ruff and the rest of dev.in, and what only they need, stay out of the
    images: every requirement file and package the image's last stage pip-installs is checked."""
    dev_only = requirement_names(REQUIREMENTS / "dev.in") | (set(lock()) - set(lock(RUNTIME_LOCK)))
    assert {"pytest", "moto", "ruff", "helm-python-sdk", "kubernetes-validate",
            "cel-python"} <= dev_only
    dev_only -= set(runtime_closure())  # e.g. jsonschema: a dev tool and a runtime dependency
    assert "pytest" in dev_only and "jsonschema" not in dev_only
    stage = final_stage(dockerfile)
    files = installed_requirement_files(stage)
    assert RUNTIME_LOCK in files, files
    for path in files:
        leaked = requirement_names(ROOT / path) & dev_only
        assert not leaked, f"{dockerfile.name} installs dev packages from {path}: {leaked}"
    for command in re.findall(r"pip install ([^&\n]+)", stage.replace("\\\n", " ")):
        words = {canonical(re.split(r"[<>=\[]", w.strip('"'))[0]) for w in command.split()
                 if not w.startswith(("-", "/", "."))}
        assert not words & dev_only, f"{dockerfile.name}: pip install {command}"
    # The check sees a leak: the dev lock would bring pytest in.
    assert requirement_names(REQUIREMENTS / "lock.txt") & dev_only


def test_make_images_writes_an_sbom_of_each_image():
    out = subprocess.run(["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    sboms = re.findall(r"syft docker:(\S+) -o spdx-json=(\S+\.spdx\.json)", out)
    images = re.findall(r"-t (\S+) \.", out.replace("\\\n", " ").replace("\t", ""))
    assert len(images) == 2 and [image for image, _ in sboms] == images, (images, sboms)


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
