import numpy as np
import pytest
import torch
import torch_fidelity

from ptq4dm.metrics import ImageStatistics, compute_metrics, extract_features
from ptq4dm.metrics.reference import load_statistics, reference_statistics, save_statistics
from tests.conftest import synthetic_images
from tests.small_extractor import NAME as SMALL


def _images(n, seed):
    return torch.from_numpy(synthetic_images(n, seed)).permute(0, 3, 1, 2).contiguous()


def _stats(images, extractor, name="set"):
    return ImageStatistics.from_features(name, SMALL, extract_features(images, extractor, 64, progress=False))


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_far(small_extractor):
    a = _images(200, seed=0)
    b = _images(200, seed=1)  # the same distribution, other draws
    shifted = (a.float() * 0.3 + 20).to(torch.uint8)  # darker, lower contrast
    sa, sb, ss = (_stats(x, small_extractor) for x in (a, b, shifted))
    self_fid = compute_metrics(sa, sa, kid_subset_size=100)
    same_dist = compute_metrics(sb, sa, kid_subset_size=100)
    far = compute_metrics(ss, sa, kid_subset_size=100)
    assert abs(self_fid["fid"]) < 1e-4 and abs(self_fid["sfid"]) < 1e-4  # eigenvalue round-off only
    assert self_fid["precision"] == 1.0 and self_fid["recall"] == 1.0
    assert far["fid"] > 10 * max(same_dist["fid"], 1e-3)
    assert far["sfid"] > 5 * max(same_dist["sfid"], 1e-3)
    assert far["kid"] > 10 * abs(same_dist["kid"])


def test_our_numbers_equal_torch_fidelitys_own_pipeline(small_extractor, tmp_path):
    from torch.utils.data import TensorDataset

    class Images(TensorDataset):
        def __getitem__(self, i):
            return self.tensors[0][i]

    a, b = _images(120, 0), (_images(120, 3).float() * 0.8).to(torch.uint8)
    ours = compute_metrics(_stats(a, small_extractor), _stats(b, small_extractor), kid_subset_size=50)
    theirs = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), fid=True, kid=True, prc=True,
                                              feature_extractor=SMALL, kid_subset_size=50, cuda=False,
                                              verbose=False, cache=False, batch_size=64)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])


def test_statistics_round_trip_through_npz(small_extractor, tmp_path):
    s = _stats(_images(64, 0), small_extractor)
    path = save_statistics(s, tmp_path / "s.npz", with_features=False)
    back = load_statistics(path)
    assert back.features == {} and back.num_images == 64
    np.testing.assert_allclose(back.stats["2048"]["sigma"], s.stats["2048"]["sigma"], rtol=1e-5, atol=1e-8)
    other = _stats(_images(64, 5), small_extractor)
    assert compute_metrics(other, back)["fid"] == pytest.approx(compute_metrics(other, s)["fid"], rel=1e-5)
    assert compute_metrics(other, back)["kid"] is None  # statistics alone cannot give KID: reported, not guessed


def test_reference_statistics_are_computed_once_then_cached(small_extractor, image_folder_root, tmp_path):
    calls = []
    original = small_extractor.forward
    small_extractor.forward = lambda x: calls.append(len(x)) or original(x)
    try:
        first = reference_statistics(image_folder_root, "train", extractor=small_extractor, cache_dir=tmp_path)
        second = reference_statistics(image_folder_root, "train", extractor=small_extractor, cache_dir=tmp_path)
    finally:
        small_extractor.forward = original
    assert sum(calls) == 40  # features of the 40 images, extracted once
    assert first.name == second.name == "cifar10-train-image_folder"
    np.testing.assert_allclose(second.stats["2048"]["mu"], first.stats["2048"]["mu"])
    assert len(second.features["2048"]) == 40
    # the features kept for KID and precision/recall are part of the cache's key: another count is not served
    # the first job's
    fewer = reference_statistics(image_folder_root, "train", extractor=small_extractor, cache_dir=tmp_path,
                                 max_features=8)
    assert len(fewer.features["2048"]) == 8


def test_non_finite_features_are_refused(small_extractor):
    class Broken(torch.nn.Module):
        features_list = ["2048"]

        def forward(self, x):
            return (torch.full((len(x), 4), float("nan")),)

    with pytest.raises(FloatingPointError, match="2048"):
        extract_features(_images(4, 0), Broken(), progress=False)


def test_real_fid_network_features():
    """The shipped FID Inception network itself: right feature sizes, deterministic, FID of a set to itself 0."""
    from ptq4dm.metrics import make_extractor

    extractor = make_extractor("cpu")
    images = _images(6, 0)
    f1 = extract_features(images, extractor, progress=False)
    assert f1["2048"].shape == (6, 2048) and f1["spatial"].shape == (6, 17 * 17 * 7)
    assert (f1["2048"] >= 0).all()  # pool3 of ReLU features
    f2 = extract_features(images.flip(0), extractor, progress=False)
    torch.testing.assert_close(f2["2048"].flip(0), f1["2048"], rtol=1e-4, atol=1e-4)


def test_wrong_network_file_is_refused(tmp_path):
    from ptq4dm.metrics.inception import check_network_file

    with pytest.raises(FileNotFoundError, match="metrics.inception_path"):
        check_network_file(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="sha1"):
        check_network_file(tmp_path / "bad.pt")


def test_fid_bootstrap_spread_matches_fresh_draws():
    """The paired bootstrap's standard error of FID(b) - FID(a), from one draw of paired features, against the
    standard deviation of that difference over 200 fresh draws (b a systematic change of a plus noise, as a
    quantized image is of its FP one). The standard deviation over 200 draws is itself known to about 5% and one
    bootstrap's (150 replicates) to about 6%: 0.75 to 1.33 is several of both."""
    from ptq4dm.metrics.bootstrap import _frechet, _sqrt_psd, paired_fid_difference

    d, n = 32, 600
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    change = torch.eye(d, dtype=torch.float64) * 0.97 + 0.02 * torch.randn(d, d, generator=g, dtype=torch.float64)
    ref = {"mu": np.zeros(d), "sigma": (mix @ mix.T + 0.5 * torch.eye(d, dtype=torch.float64)).numpy()}
    mu, sigma = torch.as_tensor(ref["mu"]), torch.as_tensor(ref["sigma"])
    root = _sqrt_psd(sigma)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(n, d, generator=g, dtype=torch.float64) @ (1.05 * mix.T) + 0.05
        return a, a @ change + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)

    diffs = [float(_frechet(b, mu, sigma, root) - _frechet(a, mu, sigma, root)) for a, b in map(draw, range(200))]
    a, b = draw(1000)
    spread = paired_fid_difference(b, a, ref, replicates=150, seed=0)
    assert spread["replicates"] == 150
    assert 0.75 < spread["se"] / np.std(diffs, ddof=1) < 1.33


def test_fid_bootstrap_point_formula_and_refusals():
    """Each replicate's FID is frechet_distance's value (itself checked against torch-fidelity above; here with
    no resampling), on both
    paths (fewer images than dimensions, and more); unpaired sets and a single replicate are refused."""
    from ptq4dm.metrics.bootstrap import _frechet, _sqrt_psd, paired_fid_difference
    from ptq4dm.metrics.fidelity import frechet_distance

    g = torch.Generator().manual_seed(1)
    ref = torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                                 dtype=torch.float64)
    ref_stats = ImageStatistics.from_features("ref", SMALL, {"2048": ref})
    s = ref_stats.stats["2048"]
    mu, sigma = torch.as_tensor(s["mu"]), torch.as_tensor(s["sigma"])
    for n in (10, 100):
        x = torch.randn(n, 16, generator=g, dtype=torch.float64) + 0.2
        expected = frechet_distance(ref_stats, ImageStatistics.from_features("x", SMALL, {"2048": x}), "2048")
        assert float(_frechet(x, mu, sigma, _sqrt_psd(sigma))) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        paired_fid_difference(torch.zeros(5, 16), torch.zeros(6, 16), s, 10)
    with pytest.raises(ValueError, match="2 or more"):
        paired_fid_difference(torch.zeros(5, 16), torch.zeros(5, 16), s, 1)
