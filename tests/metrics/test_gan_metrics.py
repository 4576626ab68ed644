"""FID, KID and precision/recall on features with known answers; the feature extractors."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from dermml.config import ConfigError, load_config
from dermml.metrics.gan import (
    INCEPTION_FILE,
    FeatureExtractor,
    FeatureExtractorError,
    GanMetricsConfig,
    build_extractor,
    extract_features,
    fid_from_features,
    frechet_distance,
    gan_metrics,
    kid_from_features,
    knn_radii,
    model_extractor,
    precision_recall_from_features,
)


def gaussian(n, d, seed, mean=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(mean, scale, size=(n, d))


# --- FID ------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(400, 16, 0) @ np.random.default_rng(1).normal(size=(16, 16))
    fid = fid_from_features(x, x)
    assert abs(fid) < 1e-6 * np.trace(np.cov(x, rowvar=False))


def test_fid_grows_monotonically_with_a_mean_shift():
    x, y = gaussian(500, 8, 0), gaussian(500, 8, 1)
    fids = [fid_from_features(x, y + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False))
    # The mean term is exactly |shift|^2 * D on top of the unshifted distance.
    assert fids[-1] - fids[0] == pytest.approx(16 * 8 + 2 * 4 * 8 * (y.mean(0) - x.mean(0)).mean(),
                                               rel=1e-6)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    d = 6
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # one rotation of both: the covariances commute
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Non-commuting covariances: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric root.
    s2 = rng.normal(size=(d, d))
    s2 = s2 @ s2.T + np.eye(d)
    r1 = scipy.linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(3)
    n, d = 40_000, 3
    x = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5])
    y = rng.normal(size=(n, d)) * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for the diagonal covariances a, b.
    expected = 1.0 + (1.0 - 2.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0
    assert fid_from_features(x, y) == pytest.approx(expected, abs=0.05)


def test_fid_rejects_features_of_different_extractors():
    with pytest.raises(ValueError, match="different extractors"):
        fid_from_features(gaussian(10, 4, 0), gaussian(10, 5, 1))


# --- KID ------------------------------------------------------------------------------------


def naive_unbiased_mmd2(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_is_the_unbiased_mmd2_with_the_cubic_kernel():
    x, y = gaussian(50, 5, 0), gaussian(50, 5, 1, mean=0.3)
    # One subset of all rows: the subset order does not change the statistic.
    assert kid_from_features(y, x, num_subsets=1, max_subset_size=1000) == \
        pytest.approx(naive_unbiased_mmd2(x, y), rel=1e-10)


def test_kid_is_unbiased_for_two_samples_of_one_distribution_and_positive_when_shifted():
    same, shifted = [], []
    for r in range(40):
        real, fake = gaussian(200, 8, 2 * r), gaussian(200, 8, 2 * r + 1)
        same.append(kid_from_features(real, fake, num_subsets=10, max_subset_size=100, seed=r))
        shifted.append(kid_from_features(real, fake + 0.5, num_subsets=10, max_subset_size=100,
                                         seed=r))
    se = np.std(same, ddof=1) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se
    assert np.mean(shifted) > 10 * np.std(shifted, ddof=1) / np.sqrt(len(shifted))


def test_kid_depends_only_on_its_seed():
    x, y = gaussian(300, 4, 0), gaussian(300, 4, 1)
    assert kid_from_features(x, y, 5, 50, seed=7) == kid_from_features(x, y, 5, 50, seed=7)
    assert kid_from_features(x, y, 5, 50, seed=7) != kid_from_features(x, y, 5, 50, seed=8)


# --- precision / recall ---------------------------------------------------------------------


def reference_pr(real, fake, k):
    """The reference's computation without any batching."""
    r, f = torch.tensor(real, dtype=torch.float32), torch.tensor(fake, dtype=torch.float32)
    out = []
    for manifold, probes in ((r, f), (f, r)):
        kth = torch.cdist(manifold, manifold).kthvalue(k + 1, dim=1).values
        out.append(float((torch.cdist(probes, manifold) <= kth).any(dim=1).float().mean()))
    return tuple(out)


def test_precision_recall_of_identical_sets_is_one():
    x = gaussian(300, 8, 0)
    assert precision_recall_from_features(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    assert precision_recall_from_features(gaussian(200, 8, 0),
                                          gaussian(200, 8, 1, mean=100.0)) == (0.0, 0.0)


def test_fake_covering_half_of_real_has_full_precision_and_half_recall():
    cluster_a, cluster_b = gaussian(300, 4, 0), gaussian(300, 4, 1, mean=50.0)
    real = np.concatenate([cluster_a, cluster_b])
    fake = gaussian(300, 4, 2)  # from cluster a's distribution only
    precision, recall = precision_recall_from_features(real, fake, k=3)
    assert precision > 0.9
    assert recall == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("batch_size", [7, 64, 10_000])
def test_batched_precision_recall_equals_the_unbatched_reference(batch_size):
    real, fake = gaussian(150, 6, 0), gaussian(130, 6, 1, mean=0.4, scale=1.3)
    ours = precision_recall_from_features(real, fake, k=3, batch_size=batch_size)
    assert ours == pytest.approx(reference_pr(real, fake, 3), abs=1e-12)


def test_knn_radii_are_the_kth_neighbour_distances_across_blocks():
    x = torch.tensor(gaussian(50, 3, 0), dtype=torch.float32)
    expected = torch.cdist(x, x).kthvalue(4, dim=1).values
    assert torch.allclose(knn_radii(x, 3, batch_size=4), expected)
    with pytest.raises(ValueError, match="k=50"):
        knn_radii(x, 50)


def test_gan_metrics_returns_every_metric():
    x, y = gaussian(120, 4, 0), gaussian(120, 4, 1)
    out = gan_metrics(x, y, kid_subsets=3, kid_subset_size=50)
    assert set(out) == {"fid", "kid", "precision", "recall"}
    assert all(np.isfinite(v) for v in out.values())


# --- feature extractors ---------------------------------------------------------------------


def images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_random_extractor_is_deterministic_across_builds_and_processes():
    a, b = build_extractor("random"), build_extractor("random")
    assert a.digest == b.digest and a.name == b.name and a.dims == 512
    batch = images(4, 64)
    fa, fb = a(batch), b(batch)
    assert fa.shape == (4, 512) and fa.dtype == torch.float32
    assert torch.equal(fa, fb)
    code = ("from dermml.metrics.gan import build_extractor; "
            "print(build_extractor('random').digest)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other == a.digest


def test_random_extractor_separates_different_images():
    extractor = build_extractor("random")
    flat = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    noisy = images(8, 32)
    features = extract_features(extractor, [flat, noisy], batch_size=5)
    assert features.shape == (16, 512)
    assert np.ptp(features[:8], axis=0).max() == 0  # equal images, equal features
    gap = np.linalg.norm(features[:8].mean(0) - features[8:].mean(0))
    assert gap > 10 * np.linalg.norm(features[8:].std(0)) / np.sqrt(8)


def test_extract_features_batches_single_images_batches_and_arrays_alike():
    extractor = build_extractor("random")
    batch = images(7, 32)
    whole = extractor(batch).numpy()
    items = [batch[0], batch[1:4], batch[4].permute(1, 2, 0).numpy(), batch[5:7]]
    got = extract_features(extractor, items, batch_size=3)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    # Images of another size go into their own batch.
    mixed = extract_features(extractor, [batch[0], images(1, 48)[0], batch[1]], batch_size=8)
    assert mixed.shape == (3, 512)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(extractor, [batch.float()])
    with pytest.raises(ValueError, match="no images"):
        extract_features(extractor, [])


def test_model_extractor_wraps_a_callers_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    extractor = build_extractor("model", model=net)
    assert extractor.dims == 4 and len(extractor.digest) == 64
    assert extractor(images(2, 40)).shape == (2, 4)
    named = model_extractor(net, lambda m, x: m(x) * 2, name="models:/clf/3", input_size=32)
    assert named.name == "models:/clf/3" and named.digest != extractor.digest
    assert build_extractor("model", model=named) is named
    with pytest.raises(FeatureExtractorError, match="metrics.extractor=model"):
        build_extractor("model")
    with pytest.raises(FeatureExtractorError, match="random, inception, model"):
        build_extractor("vgg")


def test_missing_inception_weights_name_the_setting_and_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FeatureExtractorError) as err:
        build_extractor("inception", weights=str(missing))
    message = str(err.value)
    assert "\n" not in message
    assert "metrics.inception_weights" in message and str(missing) in message
    assert INCEPTION_FILE in message and "https://" in message
    with pytest.raises(FeatureExtractorError, match="metrics.inception_weights: empty"):
        build_extractor("inception")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureExtractorError, match="not a torch state dict"):
        build_extractor("inception", weights=str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(FeatureExtractorError, match="does not fit"):
        build_extractor("inception", weights=str(wrong))


def test_inception_extractor_runs_with_random_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("torch_fidelity")
    # torchvision's Inception-v3 layout is the one the published weights use (pytorch-fid).
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=False)
    path = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), path)
    with pytest.warns(UserWarning, match="not comparable"):
        extractor = build_extractor("inception", weights=str(path))
    assert extractor.dims == 2048 and extractor.name.startswith("inception-v3-custom")
    features = extract_features(extractor, [images(2, 64)], batch_size=2)
    assert features.shape == (2, 2048) and np.isfinite(features).all()


def test_config_defaults_and_extractor_checks():
    cfg = GanMetricsConfig()
    assert (cfg.extractor, cfg.pr_k, cfg.kid_subsets) == ("random", 3, 100)
    with pytest.raises(ConfigError, match="inception_weights"):
        load_config(GanMetricsConfig, overrides=["extractor=inception"])
    with pytest.raises(ConfigError, match="extractor_model"):
        load_config(GanMetricsConfig, overrides=["extractor=model"])
    cfg = load_config(GanMetricsConfig, overrides=["extractor=inception",
                                                  "inception_weights=/w.pth"])
    assert cfg.inception_weights == "/w.pth"


def test_feature_extractor_is_the_common_interface():
    extractor = build_extractor("random")
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.info() == {"feature_extractor": extractor.name,
                                "feature_extractor_digest": extractor.digest,
                                "feature_dims": 512}
