"""Calibration sets, time-step distributions and range search."""

import numpy as np
import pytest
import torch

from ptq4dm.calibration import (
    CosineDistance,
    Gaussian,
    KLDivergence,
    LpDistance,
    MinMax,
    PearsonDistance,
    Percentile,
    RandomSteps,
    Single,
    Trajectory,
    Uniform,
    build_calibration_set,
)
from ptq4dm.calibration.search import search_range
from ptq4dm.diffusion import Sampler, seeded_generators
from ptq4dm.models import build_noise_scheduler, build_unet
from ptq4dm.quant import Quantizer, QuantSpec


# --- range search -------------------------------------------------------------------------------------------

def _outlier_data(n=20000, seed=0):
    """Uniform [-1, 1] plus 0.01% outliers at +-12: clipping them is right for every distance-like metric."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, n, generator=g) * 2 - 1
    x[0, : n // 10000] = 12.0
    x[0, n // 10000: n // 5000] = -12.0
    return x


def _brute_force(x, spec, score_fn, K=100):
    """An independent NumPy search over the same candidate grid."""
    xs = x.numpy().ravel().astype(np.float64)
    best, best_alpha = np.inf, None
    for alpha in np.linspace(1.0, 1.0 / K, K):
        amax = alpha * max(-xs.min(), xs.max())
        scale = amax / spec.qmax
        xq = np.clip(np.round(xs / scale), spec.qmin, spec.qmax) * scale
        s = score_fn(xs, xq)
        if s < best:
            best, best_alpha = s, alpha
    return best_alpha * max(-xs.min(), xs.max())


NUMPY_SCORES = {
    "mse": (LpDistance(2.0), lambda x, q: np.mean((x - q) ** 2)),
    "lp2.4": (LpDistance(2.4), lambda x, q: np.mean(np.abs(x - q) ** 2.4)),
    "l1": (LpDistance(1.0), lambda x, q: np.mean(np.abs(x - q))),
    "cosine": (CosineDistance(), lambda x, q: 1 - x @ q / (np.linalg.norm(x) * np.linalg.norm(q))),
    "pearson": (PearsonDistance(), lambda x, q: 1 - np.corrcoef(x, q)[0, 1]),
}


@pytest.mark.parametrize("name", sorted(NUMPY_SCORES))
def test_search_finds_the_best_candidate(name):
    metric, numpy_score = NUMPY_SCORES[name]
    spec = QuantSpec(4, symmetric=True)
    x = _outlier_data()
    lo, hi, score, minmax_score = search_range(x, x.min(1).values, x.max(1).values, Quantizer(spec), metric, 100)
    expected = _brute_force(x, spec, numpy_score)
    assert float(hi) == pytest.approx(expected, rel=0.03)  # the same candidate (grid step 1%)
    assert float(hi) < 6  # and the outliers are clipped
    assert float(score) <= float(minmax_score)


def test_kl_clips_outliers_of_a_half_gaussian():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50000, generator=g).abs()  # one-sided, like activations after a ReLU-like function
    x[0, :20] = 30.0
    lo, hi, score, base = search_range(x, x.min(1).values, x.max(1).values, Quantizer(QuantSpec(8)),
                                       KLDivergence(), 100)
    assert 2.5 < float(hi) < 12  # keeps the bulk, drops the far outliers
    assert float(score) < float(base)


def test_fixed_range_rules():
    x = _outlier_data()
    lo, hi, score, _ = search_range(x, x.min(1).values, x.max(1).values, Quantizer(QuantSpec(8)), MinMax(), 100)
    assert (float(lo), float(hi), score) == (-12.0, 12.0, None)
    lo, hi, _, _ = search_range(x, x.min(1).values, x.max(1).values, Quantizer(QuantSpec(8)), Percentile(99.0), 100)
    assert float(hi) == pytest.approx(np.percentile(x.numpy(), 99.0), abs=1e-3)
    assert float(lo) == pytest.approx(np.percentile(x.numpy(), 1.0), abs=1e-3)


def test_per_channel_search_keeps_channels_apart():
    x = torch.stack([torch.linspace(-1, 1, 1000), torch.linspace(-8, 8, 1000)])
    lo, hi, _, _ = search_range(x, x.amin(1), x.amax(1), Quantizer(QuantSpec(8, per_channel=True), 2),
                                LpDistance(2.0), 100)
    assert float(hi[0]) == pytest.approx(1.0, rel=0.02) and float(hi[1]) == pytest.approx(8.0, rel=0.02)


def _silu_values_and_a_stretched_max(n=50000):
    """Post-SiLU activations (a dense lobe down to -0.28, a tail to about 7) whose observed maximum, 30, comes
    from one unusual calibration sample that the random value sample does not hold (as in ValueSample)."""
    x = torch.nn.functional.silu(torch.randn(1, n, generator=torch.Generator().manual_seed(0)) * 1.5)
    return x, x.amin(1), torch.tensor([30.0])


def _brute_force_2d(x, xmin, xmax, spec, p=2.4, K=100):
    """An independent NumPy search over every (lo, hi) pair of the candidate factors: the best Lp score."""
    xs = x.numpy().ravel().astype(np.float64)
    best = np.inf
    for a in np.linspace(1.0, 1.0 / K, K):
        for b in np.linspace(1.0, 1.0 / K, K):
            lo, hi = a * float(xmin), b * float(xmax)
            scale = (hi - lo) / (spec.qmax - spec.qmin)
            zp = np.clip(np.round(-lo / scale), spec.qmin, spec.qmax)
            xq = (np.clip(np.round(xs / scale) + zp, spec.qmin, spec.qmax) - zp) * scale
            best = min(best, np.mean(np.abs(xs - xq) ** p))
    return best


def test_independent_ends_clip_a_tail_that_one_shared_factor_cannot():
    x, xmin, xmax = _silu_values_and_a_stretched_max()
    spec = QuantSpec(8)
    lo_j, hi_j, score_j, _ = search_range(x, xmin, xmax, Quantizer(spec), LpDistance(2.4), 100, independent_ends=False)
    lo, hi, score, minmax_score = search_range(x, xmin, xmax, Quantizer(spec), LpDistance(2.4), 100,
                                               independent_ends=True)
    # One shared factor: clipping the tail would clip the lobe as much, so it keeps the stretched range.
    assert float(hi_j) == pytest.approx(30.0) and float(score_j) == pytest.approx(float(minmax_score))
    # Each end on its own: the lobe stays whole, the tail is clipped where the data end.
    assert float(lo) == pytest.approx(float(xmin), rel=0.02) and 5.0 < float(hi) < 8.0
    assert float(score) < float(score_j) / 10
    assert float(score) == pytest.approx(_brute_force_2d(x, xmin, xmax, spec), rel=0.02)


def test_symmetric_grids_have_no_ends_to_move():
    x, xmin, xmax = _silu_values_and_a_stretched_max()
    spec = QuantSpec(8, symmetric=True)
    joint = search_range(x, xmin, xmax, Quantizer(spec), LpDistance(2.4), 100, independent_ends=False)
    separate = search_range(x, xmin, xmax, Quantizer(spec), LpDistance(2.4), 100, independent_ends=True)
    for a, b in zip(joint, separate):
        assert torch.equal(a, b)


# --- time steps -----------------------------------------------------------------------------------------------

ALL_STEPS = torch.arange(999, -1, -1)  # a sampler that visits every t


@pytest.mark.parametrize("mean,std", [(0.4, 0.4), (0.5, 0.05), (0.2, 0.1)])
def test_ndtc_time_steps_have_the_configured_mean_and_spread(mean, std):
    steps = Gaussian(mean, std).draw(200_000, ALL_STEPS, 1000, torch.Generator().manual_seed(0))
    t = ALL_STEPS[steps].double()
    # The same law from NumPy: N(mean*T, std*T), rounded down, clamped to [0, T-1].
    ref = np.clip(np.floor(np.random.default_rng(1).normal(mean * 1000, std * 1000, 200_000)), 0, 999)
    assert float(t.mean()) == pytest.approx(ref.mean(), abs=3)
    assert float(t.std()) == pytest.approx(ref.std(), abs=3)
    if std <= 0.1:  # little clamping: the configured moments themselves
        assert float(t.mean()) == pytest.approx(mean * 1000, abs=3)
        assert float(t.std()) == pytest.approx(std * 1000, abs=3)


def test_time_steps_are_always_the_samplers_own():
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=10)  # respaced: 900, 800, ..., 0
    allowed = set(sampler.timesteps.tolist())
    g = torch.Generator().manual_seed(0)
    for dist in (Gaussian(0.4, 0.4), Uniform(), RandomSteps(), Single(0.33)):
        t = sampler.timesteps[dist.draw(500, sampler.timesteps, 1000, g)]
        assert set(t.tolist()) <= allowed
    uniform = Uniform().draw(50, sampler.timesteps, 1000, g)
    assert torch.bincount(uniform).tolist() == [5] * 10
    assert set(sampler.timesteps[Single(0.33).draw(7, sampler.timesteps, 1000, g)].tolist()) == {300}


def test_bad_distribution_parameters_name_the_key():
    with pytest.raises(ValueError, match="calib.timesteps.std=0"):
        Gaussian(0.4, 0)
    with pytest.raises(ValueError, match="calib.timesteps.mean=1.5"):
        Gaussian(1.5, 0.4)


# --- calibration inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps", [("ddim", 10), ("ddpm", 8)])
def test_calibration_inputs_are_the_samplers_trajectory_states(name, steps):
    torch.manual_seed(0)
    unet = build_unet((32, 64, 64, 64), 8).eval()
    sampler = Sampler(build_noise_scheduler(), name, steps=steps, eta=0.0)
    denoise = lambda x, t: unet(x, t.expand(x.shape[0])).sample  # noqa: E731
    with torch.no_grad():
        calib = build_calibration_set(denoise, sampler, Gaussian(0.4, 0.4), Trajectory(), 12, (3, 32, 32),
                                      seed=5, batch_size=5)
    assert torch.equal(calib.t, sampler.timesteps[calib.step_index])
    for i in (0, 3, 11):  # replay sample i's own trajectory alone and look at the state at its step
        gens = seeded_generators(5, [i])
        seen = {}
        with torch.no_grad():
            sampler.sample(denoise, sampler.initial_noise(gens, (3, 32, 32), "cpu"), gens,
                           on_step=lambda k, t, x: seen.setdefault(k, (int(t), x.clone())))
        t, x = seen[int(calib.step_index[i])]
        assert t == int(calib.t[i])
        torch.testing.assert_close(calib.x[i], x[0], rtol=1e-3, atol=1e-3)  # batch-size round-off only


def test_value_sample_represents_early_and_late_calls_alike():
    from ptq4dm.calibration.observer import ValueSample

    obs = ValueSample(budget=1000, seed=0)
    for step in range(100):  # e.g. one call per sampler step
        obs(torch.full((4096,), float(step)))
    counts = torch.bincount(obs.values()[0].long(), minlength=100).view(10, 10).sum(1)
    assert counts.min() > 0.6 * counts.float().mean()  # each tenth of the calls holds about a tenth
    assert float(obs.min) == 0.0 and float(obs.max) == 99.0


def test_a_planted_nan_is_caught_and_its_layer_named():
    from ptq4dm.api import as_denoiser
    from ptq4dm.calibration import RangeSearch, calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet
    from ptq4dm.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    unet = quantize_(build_unet((32, 64, 64, 64), 8).eval(), QuantConfig())
    with torch.no_grad():  # poison one layer's bias: the next quantized layer (attention's to_q) sees NaN
        unet.down_blocks[1].resnets[0].conv2.layer.bias[0] = float("nan")
    calib = CalibrationSet(torch.randn(4, 3, 32, 32), torch.tensor([10, 200, 500, 900]), torch.zeros(4))
    with pytest.raises(FloatingPointError, match=r"of down_blocks\.1\.attentions\.0\.to_q\.input"):
        calibrate_(unet, as_denoiser(unet), calib, RangeSearch(), batch_size=4, progress=False)


def test_calibrating_again_starts_from_full_precision():
    """A second calibration observes full-precision activations, as the first did, and chooses again which
    quantizers stay off: its ranges equal the first's (before the fix, the weights quantized by the first run
    changed every later layer's statistics)."""
    from ptq4dm.api import as_denoiser
    from ptq4dm.calibration import RangeSearch, calibrate_
    from ptq4dm.calibration.calibset import CalibrationSet
    from ptq4dm.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    unet = quantize_(build_unet((32, 64, 64, 64), 8).eval(), QuantConfig(network_input=False))
    calib = CalibrationSet(torch.randn(6, 3, 32, 32), torch.tensor([10, 200, 500, 900, 50, 700]), torch.zeros(6))
    search = RangeSearch(num_candidates=10, max_values=2048)
    with torch.no_grad():
        first = calibrate_(unet, as_denoiser(unet), calib, search, batch_size=6, progress=False)
        x = torch.randn(2, 3, 32, 32)
        out = unet(x, torch.tensor([300, 300])).sample
        second = calibrate_(unet, as_denoiser(unet), calib, search, batch_size=6, progress=False)
        assert unet(x, torch.tensor([300, 300])).sample.equal(out)
    assert [(c.quantizer, c.tensor, c.lo, c.hi) for c in second] == [(c.quantizer, c.tensor, c.lo, c.hi) for c in first]
    assert sum(not q.enabled for q in unet.modules() if isinstance(q, Quantizer)) > 0  # x_t's stay off


def test_a_nan_during_sampling_names_the_step():
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=5)
    calls = []

    def breaks_at_third_call(x, t):
        calls.append(int(t))
        return torch.full_like(x, float("nan")) if len(calls) == 3 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"step 2 \(t=400\)"):
        sampler.sample(breaks_at_third_call, torch.randn(2, 3, 8, 8))


def test_kl_charges_a_narrow_candidate_for_rounding_too():
    """An outlier stretches the observed range, so the candidate [-3, 3] spans 120 of the 2048 shared bins, fewer
    than an 8-bit grid's 256 levels: scored at that resolution, Q equalled P and rounding cost nothing, so values
    the grid must round and values already on its levels scored alike. Now the first cost more."""
    from ptq4dm.calibration import KLDivergence
    from ptq4dm.quant.quantizer import QuantSpec, fake_quantize, grid_params

    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(20000, generator=g).clamp(-3, 3)
    lo, hi, spec = torch.tensor([[-3.0]]), torch.tensor([[3.0]]), QuantSpec(8)
    scale, zero_point = grid_params(lo[0], hi[0], spec)
    on_grid = fake_quantize(bulk, scale, zero_point, spec.qmin, spec.qmax)
    outlier = torch.tensor([100.0])
    rounded, exact = (float(KLDivergence().score(torch.cat([v, outlier])[None], None, lo, hi, spec))
                      for v in (bulk, on_grid))
    assert rounded > 2 * exact > 0


def test_kl_scores_every_candidate_and_channel_at_once_as_one_at_a_time():
    from ptq4dm.calibration import KLDivergence
    from ptq4dm.quant.quantizer import QuantSpec

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 500, generator=g) * torch.tensor([[1.0], [2.0], [0.5]])
    alphas = torch.linspace(1, 0.2, 7)[:, None]
    lo, hi = alphas * x.amin(1), alphas * x.amax(1)
    kl, spec = KLDivergence(bins=256), QuantSpec(4)
    together = kl.score(x, None, lo, hi, spec)
    alone = torch.stack([torch.stack([kl.score(x[c:c + 1], None, lo[k:k + 1, c:c + 1], hi[k:k + 1, c:c + 1], spec)[0, 0]
                                      for c in range(3)]) for k in range(7)])
    torch.testing.assert_close(together, alone)
    assert together.shape == (7, 3) and torch.isfinite(together).all()


def test_ndtc_reference_pairs_inputs_and_labels_as_the_reference_code():
    """calib=ndtc_reference (reference_code_facts.md P6): a drawn k counts steps from the noisiest; the input is
    the output of step k (the finished sample for the last step) and is labelled k itself."""
    from ptq4dm.calibration import ReferenceGaussian, ReferenceSingle, ReferenceTrajectory, build_calibration_set
    from ptq4dm.diffusion import Sampler, seeded_generators
    from ptq4dm.models import build_noise_scheduler, build_unet

    torch.manual_seed(0)
    unet = build_unet((32, 64, 64, 64), 8).eval()
    sampler = Sampler(build_noise_scheduler(), "ddim", steps=6)

    def denoise(x, t):
        return unet(x, t.expand(len(x))).sample

    class Fixed(ReferenceSingle):
        def draw(self, n, sampler_timesteps, T, generator):
            return torch.tensor([0, 2, 5])

    with torch.no_grad():
        calib = build_calibration_set(denoise, sampler, Fixed(), ReferenceTrajectory(), 3, (3, 32, 32), seed=7,
                                      batch_size=3, progress=False)
        for row, k in enumerate([0, 2, 5]):  # the same batch of three trajectories, stopped after k + 1 steps
            g = seeded_generators(7, [0, 1, 2])
            x = sampler.sample(denoise, sampler.initial_noise(g, (3, 32, 32), "cpu"), g, num_steps=k + 1)
            assert torch.equal(calib.x[row], x[row].float())
    assert calib.t.tolist() == [0, 2, 5]  # the respaced index, not sampler.timesteps[k]

    g = torch.Generator().manual_seed(3)
    k = ReferenceGaussian(0.4, 0.4).draw(10000, sampler.timesteps, 1000, g)
    expected = ((torch.randn(10000, generator=torch.Generator().manual_seed(3)) * 0.4 + 0.4) * 6).to(torch.int64)
    assert torch.equal(k, expected.clamp(0, 5))  # truncated toward zero, then clamped: no draw is lost
    assert ReferenceSingle(0.5).draw(2, sampler.timesteps, 1000, g).tolist() == [3, 3]
