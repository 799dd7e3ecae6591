"""FID / KID fidelity against the reference implementations (fixture written by
scripts/fixtures/make_inception_fixture.py with pytorch-fid 0.3.0, torchmetrics 1.9.0, clean-fid 0.1.35):

- eojax's InceptionV3 (FID variant, its resize) gives pytorch-fid's InceptionV3([3]) pool3 features on
  uint8 images of three sizes (upsampled, 299 as is, downsampled), with the same seeded random weights
  (regenerated here by inception_weights.random_state_dict: no weights are stored);
- fid.frechet_distance equals pytorch-fid's calculate_frechet_distance;
- fid.kernel_distance equals torchmetrics' poly_mmd (whole sets) and clean-fid's kernel_distance (same
  seed), and an independent loop over the kernel's terms.
"""
import json
import os
import warnings

import jax
import numpy as np
import pytest

from eojax.diffusion import fid

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_fid")


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURE, "features.npz")) as z:
        features = dict(z)
    with np.load(os.path.join(FIXTURE, "distances.npz")) as z:
        distances = dict(z)
    with open(os.path.join(FIXTURE, "meta.json")) as f:
        meta = json.load(f)
    return features, distances, meta


@pytest.fixture(scope="module")
def params(ref):
    from eojax.diffusion import inception_weights

    features, _, meta = ref
    sd = inception_weights.random_state_dict(meta["seed"])
    keys = [str(k) for k in features["weight_keys"]]
    assert keys == sorted(sd), "the weight generator's keys differ from the fixture's"
    sums = np.array([sd[k].astype(np.float64).sum() for k in keys])
    # The fixture's network is these arrays: a change of numpy's random stream would show here first.
    np.testing.assert_allclose(sums, features["weight_sums"], rtol=1e-9, atol=1e-9,
                               err_msg="random_state_dict no longer reproduces the fixture's weights")
    return inception_weights.from_state_dict(sd)


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", ["small", "299", "large"])
def test_pool3_features_match_pytorch_fid(ref, params, name):
    """pytorch-fid takes x / 255 in [0, 1] and scales it to [-1, 1] after its resize; eojax takes [-1, 1]
    (bilinear resizing commutes with the affine map)."""
    from eojax.diffusion.inception import InceptionV3

    features, _, _ = ref
    images = features[f"images_{name}"].astype(np.float32) / 255.0 * 2 - 1
    got = np.asarray(jax.jit(InceptionV3().apply)({"params": params}, images))
    want = features[f"feat_{name}"]
    assert got.shape == want.shape == (len(images), 2048)
    assert _rel(got, want) < 1e-4, _rel(got, want)


def test_fixture_separates_the_fid_variant_and_the_resize(ref, params):
    """The comparison can fail: torchvision's blocks (average pools counting the padding, an average
    pool in Mixed_7c) or an antialiased downsampling move the features far beyond the tolerance."""
    import jax.numpy as jnp
    from eojax.diffusion.inception import InceptionV3, SIZE

    features, _, _ = ref
    small = features["images_small"].astype(np.float32) / 255.0 * 2 - 1
    torchvision_layout = np.asarray(jax.jit(InceptionV3(fid_variant=False).apply)({"params": params}, small))
    assert _rel(torchvision_layout, features["feat_small"]) > 1e-2
    large = features["images_large"].astype(np.float32) / 255.0 * 2 - 1
    smoothed = jax.image.resize(jnp.asarray(large), (1, SIZE, SIZE, 3), "bilinear", antialias=True)
    got = np.asarray(jax.jit(InceptionV3().apply)({"params": params}, smoothed))
    assert _rel(got, features["feat_large"]) > 1e-3


@pytest.mark.parametrize("which", ["", "_small"])
def test_frechet_distance_matches_pytorch_fid(ref, which):
    """Two 48-d sets of 300 / 260 samples, and a 16-d pair with fewer samples than dimensions (singular
    covariances: a warning, and still pytorch-fid's value)."""
    _, d, _ = ref
    a, b = fid.FeatureStats.from_features(d[f"fd{which}_a"]), fid.FeatureStats.from_features(d[f"fd{which}_b"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fid.frechet_distance_from_stats(a, b)
    assert out["fd_samples"] == min(len(d[f"fd{which}_a"]), len(d[f"fd{which}_b"]))
    assert any("fewer samples than dimensions" in str(w.message) for w in caught) == (which == "_small")
    # The singular pair's matrix square root is ill-conditioned: its last digits move with the BLAS's
    # threading (4e-9 relative between two runs on the same machine), so 1e-6 there, 1e-9 otherwise.
    np.testing.assert_allclose(out["fd"], float(d[f"fd{which}"]), rtol=1e-6 if which else 1e-9)


def _kid_loop(x, y):
    """Binkowski et al.'s unbiased MMD^2 term by term (k(a, b) = (a.b / D + 1)^3)."""
    m, dim = x.shape
    k = lambda p, q: (float(np.dot(p, q)) / dim + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_matches_torchmetrics_and_clean_fid(ref):
    _, d, meta = ref
    a, b = d["kid_a"], d["kid_b"]
    whole = fid.kernel_distance(a, b, subsets=3, subset_size=len(a))
    assert whole["kid_samples"] == 200 and whole["kid_subset_size"] == 200 and whole["kid_std"] == 0.0
    np.testing.assert_allclose(whole["kid"], float(d["kid_torchmetrics"]), rtol=1e-10)
    np.testing.assert_allclose(fid.polynomial_mmd(a, b), float(d["kid_torchmetrics"]), rtol=1e-10)
    sub = fid.kernel_distance(a, b, subsets=meta["kid_subsets"], subset_size=meta["kid_subset_size"],
                              seed=meta["kid_seed"])
    np.testing.assert_allclose(sub["kid"], float(d["kid_cleanfid"]), rtol=1e-10)
    assert sub["kid_std"] > 0 and sub["kid_subsets"] == meta["kid_subsets"]
    # Another seed draws other subsets: the match above is not an accident of the data.
    assert fid.kernel_distance(a, b, subsets=meta["kid_subsets"], subset_size=meta["kid_subset_size"],
                               seed=meta["kid_seed"] + 1)["kid"] != sub["kid"]


def test_kid_matches_an_independent_loop_and_its_subsets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.4, 1.2, size=(12, 5))
    np.testing.assert_allclose(fid.polynomial_mmd(x, y), _kid_loop(x, y), rtol=1e-12)
    np.testing.assert_allclose(fid.polynomial_mmd(y, x), fid.polynomial_mmd(x, y), rtol=1e-12)
    # Subsets: each one is the loop's MMD^2 on the rows np.random.RandomState(seed) picks (second set first).
    a, b = rng.normal(size=(30, 5)), rng.normal(0.3, size=(25, 5))
    out = fid.kernel_distance(a, b, subsets=4, subset_size=10, seed=5)
    rs = np.random.RandomState(5)
    values = []
    for _ in range(4):
        pb = rs.choice(25, 10, replace=False)
        pa = rs.choice(30, 10, replace=False)
        values.append(_kid_loop(a[pa], b[pb]))
    np.testing.assert_allclose([out["kid"], out["kid_std"]], [np.mean(values), np.std(values)], rtol=1e-10)
    assert out["kid_samples"] == 25 and out["kid_subset_size"] == 10
    # Far-apart sets score higher than two draws of one distribution (whose unbiased KID is near 0).
    same = fid.kernel_distance(rng.normal(size=(40, 5)), rng.normal(size=(40, 5)), subsets=5, subset_size=20)
    far = fid.kernel_distance(rng.normal(size=(40, 5)), rng.normal(2.0, size=(40, 5)), subsets=5, subset_size=20)
    assert far["kid"] > 10 * abs(same["kid"])


def test_kid_report_counts_warnings_and_bad_input():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 16)), rng.normal(size=(6, 16))
    with pytest.warns(UserWarning, match=r"KID from 8 and 6 samples: subsets of 6 instead of subset_size=1000"):
        out = fid.kernel_distance(a, b, subsets=3)
    assert out["kid_samples"] == 6 and out["kid_subset_size"] == 6 and np.isfinite(out["kid"])
    with pytest.warns(UserWarning) as caught:
        both = fid.feature_distances(a, b, kid_subsets=2, kid_subset_size=4)
    messages = [str(w.message) for w in caught]
    assert any("Frechet distance from 6" in m for m in messages) and not any("KID" in m for m in messages)
    assert both["fd_samples"] == both["kid_samples"] == 6 and both["kid_subset_size"] == 4
    with pytest.raises(ValueError, match=r"same D, got \(8, 16\) and \(6, 3\)"):
        fid.kernel_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2 samples per set, got 8 and 1"):
        fid.kernel_distance(a, b[:1])
    with pytest.raises(ValueError, match="subsets=0"):
        fid.kernel_distance(a, b, subsets=0)
