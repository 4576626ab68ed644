"""ITA of an image's healthy skin: colour conversion, the group table, and robustness to the
lesion, hair and the dermoscope's vignette."""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dermml.metrics.skin_tone import (
    ITA_GROUPS,
    ITA_TABLE,
    UNKNOWN,
    fitzpatrick_from_ita,
    image_ita,
    ita_group,
    lab_to_srgb,
    skin_pixels,
    srgb_to_lab,
)

SIZE = 128


def lab_for(ita: float, b: float = 15.0, a: float = 12.0) -> np.ndarray:
    """The CIELAB colour of ITA ``ita`` with the given b* and a*: L* from the definition."""
    return np.array([50.0 + b * math.tan(math.radians(ita)), a, b])


def skin_patch(ita: float, size=(SIZE, SIZE), seed: int = 0, texture: float = 0.03,
               b: float = 15.0) -> np.ndarray:
    """A uint8 sRGB patch of one skin colour with a mild multiplicative pore texture."""
    rng = np.random.default_rng(seed)
    rgb = lab_to_srgb(lab_for(ita, b))
    shade = 1 + texture * rng.standard_normal((*size, 1))
    return np.clip(rgb * shade * 255 + 0.5, 0, 255).astype(np.uint8)


def disc(size, radius: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Pixels within ``radius`` (in half-sides of the shorter side) of the centre."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    half = min(h, w) / 2
    return np.hypot((x + 0.5 - w / 2) / half - cx, (y + 0.5 - h / 2) / half - cy) <= radius


def paint(image: np.ndarray, where: np.ndarray, lab) -> np.ndarray:
    out = image.copy()
    out[where] = np.round(lab_to_srgb(np.asarray(lab, float)) * 255).astype(np.uint8)
    return out


def with_hair(image: np.ndarray, count: int = 12, seed: int = 1) -> np.ndarray:
    """Thin (1-2 px) dark brown curves across the image, as dermoscopy hair."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    layer = Image.fromarray(image)
    pen = ImageDraw.Draw(layer)
    colour = tuple(int(v) for v in np.round(lab_to_srgb(np.array([14.0, 6.0, 8.0])) * 255))
    t = np.linspace(0, 1, 20)[:, None]
    for _ in range(count):
        start = rng.uniform(0, 1, 2) * (w, h)
        run = rng.uniform(-1, 1, 2) * (w, h)
        bend = rng.normal(0, 0.2, 2) * (w, h)
        points = start + t * run + t * t * bend
        pen.line([tuple(p) for p in points], fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(layer)


def with_vignette(image: np.ndarray, radius: float = 0.85, soft: float = 0.1) -> np.ndarray:
    """A dermoscope's field of view: black outside a circle of ``radius`` half-sides, with a
    soft dark edge of width ``soft`` inside it."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((x + 0.5 - w / 2), (y + 0.5 - h / 2)) / (min(h, w) / 2)
    field = np.clip((radius - r) / soft, 0, 1)[..., None]
    return np.clip(image * field + 4 * (1 - field), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------- colour and table


def test_srgb_to_lab_matches_the_reference_values_and_inverts():
    # CIELAB D65 of sRGB white, red and a mid skin tone (skimage.color.rgb2lab's values).
    np.testing.assert_allclose(srgb_to_lab(np.ones(3)), [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 0.0, 0.0])),
                               [53.2408, 80.0925, 67.2032], atol=0.01)
    lab = np.array([[62.0, 14.0, 21.0], [30.0, 9.0, 12.0], [85.0, 8.0, 10.0]])
    np.testing.assert_allclose(srgb_to_lab(lab_to_srgb(lab)), lab, atol=1e-6)


def test_groups_follow_the_chardon_del_bino_thresholds():
    assert ITA_GROUPS == ("very_light", "light", "intermediate", "tan", "brown", "dark")
    cases = {70: "very_light", 55.01: "very_light", 55.0: "light", 41.5: "light",
             41.0: "intermediate", 28.5: "intermediate", 28.0: "tan", 10.5: "tan",
             10.0: "brown", -29.9: "brown", -30.0: "dark", -80: "dark"}
    for ita, group in cases.items():
        assert ita_group(ita) == group, ita
    assert ita_group(float("nan")) == UNKNOWN
    assert [fitzpatrick_from_ita(row[2] + 1) for row in ITA_TABLE] == \
        ["I", "II", "III", "IV", "V", "VI"]


def test_synthesis_draws_its_skin_tones_from_the_same_table():
    import dermml.metrics.skin_tone as metrics
    from dermml.synth3d import skin_tone as synth

    assert synth.ITA_RANGES is metrics.ITA_RANGES
    assert synth.srgb_to_lab is metrics.srgb_to_lab


# ------------------------------------------------------------------------ image ITA


@pytest.mark.parametrize("ita", [66.0, 48.0, 35.0, 19.0, -5.0, -45.0])
def test_ita_of_a_patch_of_known_colour_is_the_analytic_value(ita):
    patch = skin_patch(ita, seed=int(ita) + 100)
    assert image_ita(patch) == pytest.approx(ita, abs=2.0)
    assert image_ita(patch.astype(np.float32) / 255) == pytest.approx(ita, abs=2.0)
    # A 4:3 photo, and a large one (downsampled before measuring).
    assert image_ita(skin_patch(ita, size=(96, 128))) == pytest.approx(ita, abs=2.0)
    assert image_ita(skin_patch(ita, size=(700, 900))) == pytest.approx(ita, abs=2.0)


@pytest.mark.parametrize("ita", [48.0, 19.0])
def test_a_dark_lesion_inside_the_mask_does_not_change_the_group(ita):
    skin = skin_patch(ita)
    lesion = disc(skin.shape[:2], 0.72, 0.05, -0.03)  # most of the field of view
    image = paint(skin, lesion, [24.0, 12.0, 10.0])  # a dark brown-black lesion
    assert image_ita(image, lesion) == pytest.approx(ita, abs=2.0)
    assert ita_group(image_ita(image, lesion)) == ita_group(ita)
    # A mask of another size (a PH2 mask for a resized image) is fitted to the image.
    small = np.asarray(Image.fromarray(lesion).resize((64, 64), Image.NEAREST))
    assert ita_group(image_ita(image, small)) == ita_group(ita)
    # Ignoring the mask measures the lesion.
    assert ita_group(image_ita(image)) != ita_group(ita)
    # A lesion filling the whole image leaves no skin: unknown, not a guess.
    assert math.isnan(image_ita(image, np.ones(image.shape[:2], bool)))


@pytest.mark.parametrize("ita", [62.0, 35.0, -10.0, -40.0])
def test_hair_does_not_move_ita(ita):
    skin = skin_patch(ita)
    hairy = with_hair(skin, count=40)
    hair = np.abs(hairy.astype(int) - skin).max(axis=2) > 20
    assert hair.mean() > 0.1  # a hairy image
    assert image_ita(hairy) == pytest.approx(image_ita(skin), abs=2.0)
    _, measured = skin_pixels(hairy)
    assert (measured & hair).sum() <= 0.02 * hair.sum()  # the hair is left out
    lesion = disc(skin.shape[:2], 0.4)
    assert image_ita(with_hair(paint(skin, lesion, [30.0, 10.0, 12.0])), lesion) == \
        pytest.approx(ita, abs=2.0)


@pytest.mark.parametrize("ita", [62.0, 35.0, -10.0, -40.0])
@pytest.mark.parametrize("radius", [0.75, 0.95, 1.2])
def test_a_dark_vignette_does_not_move_ita(ita, radius):
    skin = skin_patch(ita, seed=3)
    framed = with_vignette(skin, radius)
    assert image_ita(framed) == pytest.approx(image_ita(skin), abs=2.0)
    # Vignette, hair and a lesion at once, on a 4:3 image.
    skin = skin_patch(ita, size=(120, 160), seed=4)
    lesion = disc(skin.shape[:2], 0.35, 0.1)
    image = with_hair(with_vignette(paint(skin, lesion, [28.0, 14.0, 16.0]), radius), seed=5)
    assert image_ita(image, lesion) == pytest.approx(ita, abs=2.0)


def test_ita_ranks_the_demo_images_by_their_skin_type(demo_data):
    """The procedural demo images (lesion, hair, glare, vignette, light fall-off): measured
    ITA falls with the Fitzpatrick type they were drawn with."""
    from scipy.stats import spearmanr

    from dermml.data.images import load_image, load_mask
    from dermml.data.manifest import read_manifest

    manifest = read_manifest(demo_data)
    df = manifest.df
    itas = [image_ita(load_image(manifest.resolve(r.image_uri)),
                      load_mask(manifest.resolve(r.mask_uri))) for r in df.itertuples()]
    assert np.isfinite(itas).all()
    assert spearmanr(df["fitzpatrick"], itas).correlation < -0.9
