"""Training augmentation: geometry moves image and mask together, pixel ops touch the image only."""

import pickle

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dermml.data.augment import AugmentConfig, HairOcclusion, build_augment

SIZE = 48
GEOMETRY_ONLY = {"color_jitter": 0.0}
NO_GEOMETRY = {"flips": False}


def marked_corner() -> tuple[np.ndarray, np.ndarray]:
    """Grey image with a bright block near the top-left corner, and that block as the mask."""
    image = np.full((SIZE, SIZE, 3), 90, np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[4:14, 6:16] = True
    image[mask] = 250
    return image, mask


def label_map() -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.int64)
    labels[14:24, 14:24] = 1
    labels[14:24, 26:34] = 3
    labels[26:34, 18:30] = 5
    return labels


def test_flips_move_the_marked_corner_to_the_same_place_in_image_and_mask():
    image, mask = marked_corner()
    augment = build_augment(AugmentConfig(**GEOMETRY_ONLY), seed=0)
    moved = 0
    for _ in range(20):
        out_image, out_mask = augment(image, mask)
        assert out_mask.dtype == bool
        np.testing.assert_array_equal(out_image[..., 0] > 170, out_mask)
        moved += not np.array_equal(out_mask, mask)
    assert moved > 10  # the corner really went elsewhere most of the time


def test_free_rotation_and_scale_keep_image_and_mask_aligned():
    image, mask = marked_corner()
    cfg = AugmentConfig(flips=False, rotate_degrees=40, scale=0.2, elastic=1.0, color_jitter=0)
    augment = build_augment(cfg, seed=1)
    for _ in range(10):
        out_image, out_mask = augment(image, mask)
        bright = out_image[..., 0] > 170
        iou = (bright & out_mask).sum() / (bright | out_mask).sum()
        assert iou > 0.8, iou  # interpolated image edges vs. nearest-neighbour mask edges


def test_label_maps_stay_integer_with_the_same_labels():
    image, _ = marked_corner()
    labels = label_map()
    cfg = AugmentConfig(rotate_degrees=30, scale=0.1, elastic=1.0, color_jitter=0.3)
    augment = build_augment(cfg, seed=2)
    changed = 0
    for _ in range(10):
        _, out = augment(image, labels)
        assert out.dtype == np.int64 and out.shape == labels.shape
        assert set(np.unique(out)) == {0, 1, 3, 5}  # no blended in-between values
        changed += not np.array_equal(out, labels)
    assert changed > 5


def test_colour_and_occlusion_ops_leave_the_mask_untouched():
    image, mask = marked_corner()
    labels = label_map()
    cfg = AugmentConfig(flips=False, color_jitter=0.5, hue=0.1, clahe=1.0, blur=1.0,
                        hair=1.0, coarse_dropout=1.0)
    augment = build_augment(cfg, seed=3)
    for target in (mask, labels):
        out_image, out_target = augment(image, target)
        np.testing.assert_array_equal(out_target, target)
        assert out_target.dtype == target.dtype
        assert not np.array_equal(out_image, image)


def test_hair_darkens_some_pixels_and_never_touches_the_mask():
    image = np.full((64, 64, 3), 220, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    pipeline = A.Compose([HairOcclusion(strands=(2, 4), p=1.0)], seed=4)
    for _ in range(5):
        out = pipeline(image=image, mask=mask)
        darker = out["image"].astype(int).sum(-1) < image.astype(int).sum(-1)
        assert 0.002 < darker.mean() < 0.3
        assert (out["image"] <= image).all()  # hair only darkens
        assert out["image"][darker].mean() < 160  # and it is dark, not a faint tint
        np.testing.assert_array_equal(out["mask"], mask)


def test_hair_through_build_augment_keeps_mask_and_is_seeded():
    image, mask = marked_corner()
    cfg = AugmentConfig(flips=False, color_jitter=0, hair=1.0, hair_strands=(3, 3))
    first = build_augment(cfg, seed=5)(image, mask)
    again = build_augment(cfg, seed=5)(image, mask)
    other = build_augment(cfg, seed=6)(image, mask)
    np.testing.assert_array_equal(first[1], mask)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_same_seed_gives_the_same_stream_of_outputs():
    image, mask = marked_corner()
    cfg = AugmentConfig(rotate_degrees=20, color_jitter=0.3, hue=0.05, hair=0.5, blur=0.5)
    a, b = build_augment(cfg, seed=7), build_augment(cfg, seed=7)
    outputs = []
    for _ in range(6):
        (ia, ma), (ib, mb) = a(image, mask), b(image, mask)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
        outputs.append(ia)
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])  # a stream, not a constant


def test_everything_disabled_gives_no_augment():
    cfg = AugmentConfig(flips=False, color_jitter=0.0)
    assert build_augment(cfg) is None


def test_default_config_is_flips_and_colour_jitter():
    cfg = AugmentConfig()
    assert cfg.flips and cfg.color_jitter == 0.1
    assert cfg.rotate_degrees == cfg.scale == cfg.hue == cfg.elastic == 0
    assert cfg.clahe == cfg.hair == cfg.blur == cfg.coarse_dropout == 0


def test_classification_images_augment_without_a_mask():
    image, _ = marked_corner()
    out_image, out_mask = build_augment(AugmentConfig(), seed=8)(image, None)
    assert out_mask is None
    assert out_image.shape == image.shape and out_image.dtype == np.uint8


def test_float_masks_and_negative_labels_are_rejected_with_a_reason():
    image, mask = marked_corner()
    augment = build_augment(AugmentConfig(), seed=0)
    with pytest.raises(TypeError, match="bool or an integer"):
        augment(image, mask.astype(np.float32))
    with pytest.raises(ValueError, match="0..65535"):
        augment(image, -label_map())


def test_out_of_range_probability_is_a_config_error():
    with pytest.raises(ValueError, match="hair"):
        AugmentConfig(hair=1.5)


class _SameImage(Dataset):
    """Four copies of one image: any difference between outputs comes from augmentation."""

    def __init__(self, augment):
        self.image, self.mask = marked_corner()
        self.augment = augment

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.augment(self.image, self.mask)[0])


def _worker_outputs(seed: int) -> list[torch.Tensor]:
    cfg = AugmentConfig(flips=False, color_jitter=0, hair=1.0)
    loader = DataLoader(_SameImage(build_augment(cfg, seed=0)), batch_size=1, num_workers=2,
                        generator=torch.Generator().manual_seed(seed))
    return [batch[0] for batch in loader]


def test_loader_workers_draw_different_but_reproducible_augmentations():
    outputs = _worker_outputs(seed=0)
    # Items 0 and 1 are the first item of worker 0 and of worker 1.
    assert not torch.equal(outputs[0], outputs[1])
    again = _worker_outputs(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(outputs, again, strict=True))


def test_augment_survives_pickling_for_spawned_workers():
    image, mask = marked_corner()
    augment = build_augment(AugmentConfig(hair=1.0, rotate_degrees=10), seed=9)
    copy = pickle.loads(pickle.dumps(augment))
    np.testing.assert_array_equal(copy(image, mask)[0], augment(image, mask)[0])


def test_another_stream_of_the_same_seed_draws_other_transforms_reproducibly():
    """Synthetic data mixed into real batches: same config and seed, not the same transforms."""
    image, mask = marked_corner()
    cfg = AugmentConfig(rotate_degrees=20, color_jitter=0.3, hue=0.05)
    real, synthetic, again = (build_augment(cfg, seed=7) for _ in range(3))
    synthetic.use_stream(1)
    again.use_stream(1)
    real_out = [real(image, mask)[0] for _ in range(4)]
    synthetic_out = [synthetic(image, mask)[0] for _ in range(4)]
    assert all(not np.array_equal(r, s) for r, s in zip(real_out, synthetic_out, strict=True))
    for s in synthetic_out:
        np.testing.assert_array_equal(s, again(image, mask)[0])


REFERENCE_PIXEL = ["CLAHE", "Emboss", "GaussNoise", "HueSaturationValue", "MultiplicativeNoise",
                   "RGBShift", "RandomBrightnessContrast", "RandomGamma", "RandomToneCurve",
                   "Sharpen", "Spatter", "UnsharpMask"]
REFERENCE_SPATIAL = ["Affine", "CoarseDropout", "ElasticTransform", "HorizontalFlip",
                     "VerticalFlip", "OneOf", "GridDistortion", "PiecewiseAffine", "PixelDropout",
                     "RandomRotate90", "Rotate"]


def test_dermosegdiff_policy_is_the_reference_set_and_keeps_masks_binary():
    """The ISIC2018/PH2/HAM10000 presets use the reference's augmentation: 12 pixel-level and
    11 spatial transforms at p 0.05, the whole set on half the images."""
    from dermml.data.augment import dermosegdiff_ops
    from dermml.training.run import resolve_config

    pixel, spatial = dermosegdiff_ops(0.05)
    assert [type(t).__name__ for t in pixel] == REFERENCE_PIXEL
    assert [type(t).__name__ for t in spatial] == REFERENCE_SPATIAL
    assert all(t.p == 0.05 for t in pixel + spatial)
    cfg = resolve_config("segdiff", "configs/segdiff/isic2018.yaml", [])
    assert cfg.augment.policy == "dermosegdiff"
    pipeline = build_augment(cfg.augment, seed=0).pipeline
    assert pipeline.p == 0.5

    # Every transform at once, many times: image and mask keep their shapes, masks stay 0/1.
    everything = build_augment(AugmentConfig(policy="dermosegdiff", reference_p=1.0,
                                             reference_apply=1.0), seed=1)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 20:44] = True
    changed = 0
    for _ in range(5):
        out, out_mask = everything(image, mask)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out_mask.dtype == bool and out_mask.shape == mask.shape
        assert 0 < out_mask.sum() < mask.size
        changed += int(not np.array_equal(out, image))
    assert changed == 5
    off = build_augment(AugmentConfig(policy="dermosegdiff", reference_apply=0.0), seed=1)
    assert np.array_equal(off(image, mask)[0], image)
