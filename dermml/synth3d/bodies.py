"""Textured body meshes: the ``Body`` record, OBJ loading and the 3DBodyTex folder layout.

A body is a triangle mesh with its own UV layout (``verts_uvs`` / ``faces_uvs``, as in an OBJ and
in pytorch3d), a square RGB texture, a non-skin texture mask (clothes, hair: 1) and per-vertex
anatomy labels (DermSynth3D's 17 labels). 3DBodyTex keeps each scan in ``<id>/`` as
``model_highres_0_normalized.obj`` + ``.mtl`` + ``.png``; DermSynth3D adds the non-skin mask
``model_highres_0_normalized_mask.png`` and the labels ``vertslabels_scan.npy``, each in a
folder per scan id of its own tree.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dermml.synth3d.anatomy import ANATOMY_LABELS
from dermml.synth3d.renderer import Meshes, TexturesUV
from dermml.synth3d.skin_tone import measure_skin_tone

BODYTEX_OBJ = "model_highres_0_normalized.obj"
BODYTEX_NONSKIN = "model_highres_0_normalized_mask.png"
BODYTEX_LABELS = "vertslabels_scan.npy"
MIN_TEXTURE_SIZE = 16


class BodyError(ValueError):
    """A body mesh, texture, mask or label file cannot be used; the message names the file."""


@dataclass
class Body:
    """A textured body mesh with skin mask and anatomy labels (numpy arrays)."""

    body_id: str
    verts: np.ndarray
    """(V, 3) float32 positions (metres for 3DBodyTex and procedural bodies)."""
    faces: np.ndarray
    """(F, 3) int64 vertex indices, counter-clockwise seen from outside."""
    verts_uvs: np.ndarray
    """(T, 2) float32 UVs in [0, 1] (v = 0: bottom row of the texture)."""
    faces_uvs: np.ndarray
    """(F, 3) int64 indices into ``verts_uvs``."""
    texture: np.ndarray
    """(S, S, 3) float32 RGB in [0, 1]."""
    nonskin: np.ndarray
    """(S, S) bool: texels that are not skin (clothes, hair, shoes)."""
    vertex_labels: np.ndarray
    """(V,) uint8 anatomy label per vertex (0 where unknown)."""
    skin_type: str | None = None
    """Fitzpatrick type I..VI of the skin texture (None when unknown)."""
    ita: float | None = None
    """Individual Typology Angle of the mean skin texel, degrees."""
    source: str = ""
    """Where the body came from (an OBJ path or ``procedural``)."""
    params: dict = field(default_factory=dict)
    """Shape parameters of a procedural body."""

    @property
    def texture_size(self) -> int:
        return int(self.texture.shape[0])

    def face_labels(self) -> np.ndarray:
        """(F,) label of each face: that of its first vertex (as DermSynth3D renders them)."""
        return self.vertex_labels[self.faces[:, 0]]

    def meshes(self, device: str | torch.device = "cpu") -> Meshes:
        textures = TexturesUV(torch.from_numpy(self.texture).to(device),
                              torch.from_numpy(self.faces_uvs).to(device),
                              torch.from_numpy(self.verts_uvs).to(device))
        return Meshes(torch.from_numpy(self.verts).to(device),
                      torch.from_numpy(self.faces).to(device), textures)

    def check(self) -> None:
        """Raise ``BodyError`` when the arrays do not fit together."""
        name = self.source or self.body_id
        if self.faces_uvs.shape != self.faces.shape:
            raise BodyError(f"{name}: {len(self.faces_uvs)} UV faces for {len(self.faces)} faces")
        if len(self.vertex_labels) != len(self.verts):
            raise BodyError(f"{name}: {len(self.vertex_labels)} anatomy labels for "
                            f"{len(self.verts)} vertices")
        if self.nonskin.shape != self.texture.shape[:2]:
            raise BodyError(f"{name}: non-skin mask {self.nonskin.shape} differs from the "
                            f"texture {self.texture.shape[:2]}")


# ------------------------------------------------------------------------------ OBJ files


@dataclass
class ObjMesh:
    verts: np.ndarray
    faces: np.ndarray
    verts_uvs: np.ndarray
    faces_uvs: np.ndarray | None
    texture_file: str | None


def _parse_face_tokens(tokens: list[str], n_verts: int, n_uvs: int, path: str, lineno: int
                       ) -> tuple[list[int], list[int] | None]:
    v_idx, t_idx = [], []
    for tok in tokens:
        parts = tok.split("/")
        try:
            v = int(parts[0])
            t = int(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            raise BodyError(f"{path}:{lineno}: bad face entry {tok!r}") from None
        v_idx.append(v - 1 if v > 0 else n_verts + v)
        t_idx.append(None if t is None else (t - 1 if t > 0 else n_uvs + t))
    return v_idx, (None if any(t is None for t in t_idx) else t_idx)


def read_obj(path: str | os.PathLike) -> ObjMesh:
    """Vertices, triangles (polygons fanned), UVs and the texture named by its MTL file."""
    path = str(path)
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise BodyError(f"{path}: cannot read the mesh ({exc.strerror})") from None
    verts, uvs, faces, faces_uvs, mtllibs = [], [], [], [], []
    missing_uv = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line or line[0] == "#":
            continue
        head, _, rest = line.partition(" ")
        if head == "v":
            verts.append(rest.split()[:3])
        elif head == "vt":
            uvs.append(rest.split()[:2])
        elif head == "f":
            v_idx, t_idx = _parse_face_tokens(rest.split(), len(verts), len(uvs), path, lineno)
            if t_idx is None:
                missing_uv += 1
                t_idx = [0] * len(v_idx)
            for k in range(1, len(v_idx) - 1):  # fan: polygons become triangles
                faces.append((v_idx[0], v_idx[k], v_idx[k + 1]))
                faces_uvs.append((t_idx[0], t_idx[k], t_idx[k + 1]))
        elif head == "mtllib":
            mtllibs.append(rest.strip())
    try:
        verts_arr = np.asarray(verts, dtype=np.float32).reshape(-1, 3)
        uvs_arr = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
    except ValueError:
        raise BodyError(f"{path}: vertex or UV lines that are not numbers") from None
    if not len(verts_arr) or not faces:
        raise BodyError(f"{path}: no vertices or no faces; is it a Wavefront OBJ mesh?")
    faces_arr = np.asarray(faces, dtype=np.int64)
    if faces_arr.min() < 0 or faces_arr.max() >= len(verts_arr):
        raise BodyError(f"{path}: faces refer to vertices that do not exist")
    faces_uvs_arr = None
    if len(uvs_arr) and not missing_uv:
        faces_uvs_arr = np.asarray(faces_uvs, dtype=np.int64)
        if faces_uvs_arr.min() < 0 or faces_uvs_arr.max() >= len(uvs_arr):
            raise BodyError(f"{path}: faces refer to texture coordinates that do not exist")
    texture = _texture_from_mtl(path, mtllibs)
    return ObjMesh(verts_arr, faces_arr, uvs_arr, faces_uvs_arr, texture)


def _texture_from_mtl(obj_path: str, mtllibs: list[str]) -> str | None:
    folder = os.path.dirname(obj_path)
    maps = []
    for lib in mtllibs:
        mtl = os.path.join(folder, lib)
        if not os.path.isfile(mtl):
            continue
        for line in Path(mtl).read_text(errors="replace").splitlines():
            match = re.match(r"\s*map_Kd\s+(?:-\S+\s+\S+\s+)*(.+?)\s*$", line)
            if match:
                maps.append(os.path.join(folder, match.group(1)))
    maps = list(dict.fromkeys(maps))
    if len(maps) > 1:
        raise BodyError(f"{obj_path}: its materials name {len(maps)} textures "
                        f"({', '.join(os.path.basename(m) for m in maps)}); one texture atlas "
                        "per body is supported")
    return maps[0] if maps else None


def _read_image(path: str, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except FileNotFoundError:
        raise BodyError(f"{path}: file not found") from None
    except Exception as exc:  # PIL raises several types for corrupt files
        raise BodyError(f"{path}: not a readable image ({exc})") from None


def read_texture(path: str) -> np.ndarray:
    """A square RGB texture as float32 in [0, 1]."""
    rgb = _read_image(path, "RGB")
    height, width = rgb.shape[:2]
    if height != width or height < MIN_TEXTURE_SIZE:
        raise BodyError(f"texture {path} is {width}x{height}: textures must be square and at "
                        f"least {MIN_TEXTURE_SIZE} px (a UV atlas, as 3DBodyTex's 4096x4096)")
    return rgb.astype(np.float32) / 255.0


def read_nonskin_mask(path: str, texture_path: str, size: int) -> np.ndarray:
    """Non-skin texture mask (white = not skin) of the texture's size."""
    grey = _read_image(path, "L")
    if grey.shape != (size, size):
        raise BodyError(f"non-skin mask {path} is {grey.shape[1]}x{grey.shape[0]} but texture "
                        f"{texture_path} is {size}x{size}: they must match texel for texel")
    return grey > 127


def read_vertex_labels(path: str, n_verts: int, mesh_path: str) -> np.ndarray:
    """Per-vertex anatomy labels (``vertslabels_scan.npy``) for a mesh of ``n_verts``."""
    try:
        labels = np.load(path, allow_pickle=False).squeeze()
    except FileNotFoundError:
        raise BodyError(f"{path}: file not found") from None
    except (ValueError, OSError) as exc:
        raise BodyError(f"{path}: not a NumPy label array ({exc})") from None
    if labels.ndim != 1 or len(labels) != n_verts:
        raise BodyError(f"label file {path} has {labels.size} entries but mesh {mesh_path} has "
                        f"{n_verts} vertices: one anatomy label per vertex is needed")
    if labels.size and (labels.min() < 0 or labels.max() >= len(ANATOMY_LABELS)):
        raise BodyError(f"label file {path} holds labels {labels.min()}..{labels.max()}; "
                        f"DermSynth3D's anatomy labels are 0..{len(ANATOMY_LABELS) - 1}")
    return labels.astype(np.uint8)


def load_body(obj_path: str, body_id: str | None = None, texture: str | None = None,
              nonskin: str | None = None, labels: str | None = None) -> Body:
    """A body from an OBJ with UVs, its texture (from the MTL, or ``texture``), an optional
    non-skin mask (absent: all skin) and optional per-vertex labels (absent: 0)."""
    obj_path = str(obj_path)
    mesh = read_obj(obj_path)
    if mesh.faces_uvs is None:
        raise BodyError(f"mesh {obj_path} has no texture coordinates (no 'vt' lines, or faces "
                        "without v/vt indices): lesions are pasted through the UV map; unwrap "
                        "it first (e.g. xatlas or Blender's Smart UV Project)")
    texture_path = texture or mesh.texture_file or _sibling(obj_path, ".png")
    if texture_path is None or not os.path.isfile(texture_path):
        raise BodyError(f"mesh {obj_path}: no texture image (no map_Kd in its .mtl and no "
                        f"{Path(obj_path).stem}.png beside it)")
    tex = read_texture(texture_path)
    size = tex.shape[0]
    nonskin_mask = (read_nonskin_mask(nonskin, texture_path, size) if nonskin
                    else np.zeros((size, size), dtype=bool))
    vertex_labels = (read_vertex_labels(labels, len(mesh.verts), obj_path) if labels
                     else np.zeros(len(mesh.verts), dtype=np.uint8))
    uvs = mesh.verts_uvs
    if uvs.size and (uvs.min() < -1e-3 or uvs.max() > 1 + 1e-3):
        warnings.warn(f"{obj_path}: UVs outside [0, 1] are clamped to the texture border",
                      stacklevel=2)
    body = Body(body_id or Path(obj_path).parent.name, mesh.verts, mesh.faces,
                np.clip(uvs, 0, 1), mesh.faces_uvs, tex, nonskin_mask, vertex_labels,
                source=obj_path)
    body.check()
    body.skin_type, body.ita = measure_skin_tone(body.texture, body.nonskin)
    return body


def _sibling(path: str, suffix: str) -> str | None:
    candidate = str(Path(path).with_suffix(suffix))
    return candidate if os.path.isfile(candidate) else None


@dataclass(frozen=True)
class BodySource:
    """Where one body's files are (loaded lazily, in the worker that renders it)."""

    body_id: str
    obj: str
    nonskin: str | None
    labels: str | None

    def load(self) -> Body:
        return load_body(self.obj, self.body_id, nonskin=self.nonskin, labels=self.labels)


def find_bodies(root: str, nonskin_dir: str | None = None, anatomy_dir: str | None = None
                ) -> list[BodySource]:
    """Bodies below ``root``: 3DBodyTex ``<id>/model_highres_0_normalized.obj`` folders, or any
    ``*.obj``. Masks and labels are looked for beside the mesh, then in ``nonskin_dir/<id>/``
    and ``anatomy_dir/<id>/`` (DermSynth3D's own trees)."""
    if not os.path.isdir(root):
        raise BodyError(f"bodies folder {root} not found")
    objs = sorted(Path(root).rglob("*.obj"))
    if not objs:
        raise BodyError(f"{root}: no .obj meshes found (expected 3DBodyTex folders "
                        f"<id>/{BODYTEX_OBJ} or any OBJ with a texture)")
    sources = []
    for obj in objs:
        body_id = obj.parent.name if obj.name == BODYTEX_OBJ else obj.stem
        folder = obj.parent

        def first(*candidates: Path | None) -> str | None:
            return next((str(c) for c in candidates if c is not None and c.is_file()), None)

        nonskin = first(folder / BODYTEX_NONSKIN, folder / f"{obj.stem}_mask.png",
                        folder / "nonskin.png",
                        Path(nonskin_dir, body_id, BODYTEX_NONSKIN) if nonskin_dir else None)
        labels = first(folder / BODYTEX_LABELS, folder / f"{obj.stem}_labels.npy",
                       Path(anatomy_dir, body_id, BODYTEX_LABELS) if anatomy_dir else None)
        sources.append(BodySource(body_id, str(obj), nonskin, labels))
    ids = [s.body_id for s in sources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise BodyError(f"{root}: several meshes share the body id(s) {dupes}; give each its "
                        "own folder or file name")
    return sources
