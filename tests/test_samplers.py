"""Sections 7 and 10: the sampler interface and DPM-Solver++(2M), against oracles no one here wrote.

tests/data/sampler_reference.npz holds Hugging Face diffusers' DPMSolverMultistepScheduler and DDIMScheduler
trajectories in float64 (written once by tests/make_sampler_reference.py; diffusers is not needed to run this).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Oracle, constant_denoiser, state, tiny_model_config

import diffusion_utils as du

T = 1000
REFERENCE = Path(__file__).parent / "data" / "sampler_reference.npz"
SCHEDULES = {kind: du.NoiseSchedule.create(kind, T) for kind in du.SCHEDULES}


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE, allow_pickle=False)


@pytest.fixture(scope="module")
def x0():
    return du.make_shapes(3, seed=11).images


def cases(prefix: str) -> list[str]:
    return [str(name) for name in np.load(REFERENCE, allow_pickle=False)["case_names"] if str(name).startswith(prefix)]


# ------------------------------------------------------------------------------------------
# Against diffusers, step by step, in float64
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("dpm++") + cases("ddim"))
def test_every_step_agrees_with_diffusers(reference, case):
    """Fed diffusers' model outputs, our clipped x0_hat and the sample after each step match its trajectory."""
    betas = torch.from_numpy(reference["betas"])
    assert torch.allclose(betas, du.cosine_betas(T), rtol=0, atol=1e-15)  # the same schedule
    timesteps = torch.from_numpy(reference[f"{case}_timesteps"])  # descending
    spaced = du.NoiseSchedule(betas).at(timesteps.flip(0))
    sampler = du.SAMPLERS[case.split("_")[0]]
    x = torch.from_numpy(reference[f"{case}_x_T"])
    outputs = torch.from_numpy(reference[f"{case}_outputs"])  # diffusers' model output at each step, in order
    denoise = du.make_denoiser(lambda x, t: outputs[len(timesteps) - 1 - int(spaced_index[int(t[0])])], spaced, "v")
    spaced_index = {int(t): i for i, t in enumerate(spaced.timesteps)}
    run = state()  # one state for the whole run: the solver keeps its own history in it
    for k, t in enumerate(timesteps.tolist()):
        i = len(timesteps) - 1 - k
        assert int(spaced.timesteps[i]) == t
        x0_hat = denoise(x, i)
        torch.testing.assert_close(x0_hat, torch.from_numpy(reference[f"{case}_x0_hat"][k]), rtol=0, atol=1e-8)
        x = sampler.step(spaced, i, x, denoise, run)
        torch.testing.assert_close(x, torch.from_numpy(reference[f"{case}_x_after"][k]), rtol=0, atol=1e-8)


def test_the_reference_exercises_clipping_and_second_order_steps(reference):
    """A fixture that never clipped, or whose history did not matter, could not catch those bugs."""
    x0_hat = reference["dpm++_time_10_x0_hat"]
    assert (np.abs(x0_hat) == 1.0).mean() > 0.2
    first_order = reference["ddim_time_10_x_after"][-2]
    assert np.abs(reference["dpm++_time_10_x_after"][-2] - first_order).max() > 1e-2


# ------------------------------------------------------------------------------------------
# Exact oracles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "heun"])
def test_with_a_perfect_predictor_every_deterministic_sampler_returns_x0(sampler, kind, steps, x0):
    schedule = SCHEDULES[kind]
    result = du.sample(
        Oracle(schedule, x0, "v"), schedule, 3, steps=steps, sampler=sampler, prediction="v", progress=False
    )
    assert (result.images - x0).abs().max() < 1e-5


def test_dpm_solver_on_the_log_snr_grid_returns_x0_with_a_perfect_predictor(x0):
    schedule = SCHEDULES["cosine"]
    oracle = Oracle(schedule, x0, "v")
    result = du.sample(oracle, schedule, 3, steps=8, sampler="dpm++", spacing="logsnr", prediction="v", progress=False)
    assert (result.images - x0).abs().max() < 1e-5
    assert [int(t[0]) for t in oracle.seen] == du.SPACINGS["logsnr"](schedule, 8).flip(0).tolist()


def test_the_first_dpm_solver_step_is_the_ddim_step():
    """DDIM is the first-order solver of the probability-flow ODE; DPM-Solver++ starts with that order."""
    spaced = SCHEDULES["cosine"].respaced(10)
    generator = torch.Generator().manual_seed(3)
    x_t, x0 = torch.randn(2, 1, 8, 8, generator=generator), torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    for i in range(1, 10):
        dpm = du.dpm_solver_step(spaced, i, x_t, constant_denoiser(x0), state())
        ddim = du.ddim_step(spaced, i, x_t, constant_denoiser(x0), state())
        torch.testing.assert_close(dpm, ddim, rtol=0, atol=1e-6)


def test_the_second_order_step_by_hand():
    spaced = SCHEDULES["cosine"].respaced(5)
    x_t, x0, previous = torch.full((1, 1, 2, 2), 0.4), torch.full((1, 1, 2, 2), -0.6), torch.full((1, 1, 2, 2), 0.2)
    i = 2
    ab_prev_point, ab_s, ab_t = (
        float(v) for v in (spaced.alpha_bars[i + 1], spaced.alpha_bars[i], spaced.alpha_bars[i - 1])
    )
    lam = [0.5 * math.log(ab / (1 - ab)) for ab in (ab_prev_point, ab_s, ab_t)]
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    d = -0.6 + (-0.6 - 0.2) / (2 * h_prev / h)
    expected = math.sqrt((1 - ab_t) / (1 - ab_s)) * 0.4 - math.sqrt(ab_t) * math.expm1(-h) * d
    run = state()
    run.memory["x0_hat"] = previous
    got = du.dpm_solver_step(spaced, i, x_t, constant_denoiser(x0), run)
    torch.testing.assert_close(got, torch.full_like(x_t, expected), rtol=0, atol=1e-6)
    assert torch.equal(run.memory["x0_hat"], x0)  # kept for the next step
    run.memory["x0_hat"] = previous
    assert torch.equal(du.dpm_solver_step(spaced, 0, x_t, constant_denoiser(x0), run), x0)


# ------------------------------------------------------------------------------------------
# The interface: a registry, one step signature, seeds independent of the batch
# ------------------------------------------------------------------------------------------


def test_a_new_sampler_is_one_function_and_one_registry_line(x0, monkeypatch):
    monkeypatch.setattr(du, "SAMPLERS", dict(du.SAMPLERS))

    @du.register_sampler("jump")
    def jump(schedule, i, x_t, denoise, state):
        return denoise(x_t, i)

    assert (
        du.SAMPLERS["jump"].step is jump
        and "jump" in du.build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    )
    schedule = SCHEDULES["cosine"]
    result = du.sample(Oracle(schedule, x0, "v"), schedule, 3, steps=3, sampler="jump", prediction="v", progress=False)
    assert (result.images - x0).abs().max() < 1e-5


def test_a_multistep_solver_keeps_its_own_history_across_the_run(x0, monkeypatch):
    seen = []
    monkeypatch.setattr(du, "SAMPLERS", dict(du.SAMPLERS))

    @du.register_sampler("spy", spacing="logsnr")
    def spy(schedule, i, x_t, denoise, state):
        previous = state.memory.get("x0_hat")
        seen.append((i, None if previous is None else float((previous - x0).abs().max()), state.eta))
        return du.dpm_solver_step(schedule, i, x_t, denoise, state)

    schedule = SCHEDULES["cosine"]
    result = du.sample(Oracle(schedule, x0, "v"), schedule, 3, steps=4, sampler="spy", prediction="v", progress=False)
    assert [(i, eta) for i, _, eta in seen] == [(3, 0.0), (2, 0.0), (1, 0.0), (0, 0.0)]
    assert seen[0][1] is None and all(error < 1e-5 for _, error, _ in seen[1:])  # the previous step's x0_hat
    assert (result.images - x0).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(sampler):
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config()).eval()
    schedule = SCHEDULES["cosine"]
    one_go = du.sample(model, schedule, 5, steps=4, sampler=sampler, seed=2, batch_size=5, progress=False)
    chunked = du.sample(model, schedule, 5, steps=4, sampler=sampler, seed=2, batch_size=2, progress=False)
    assert torch.allclose(one_go.images, chunked.images, atol=1e-5)  # a batch's size changes only the rounding
    other = du.sample(model, schedule, 5, steps=4, sampler=sampler, seed=3, batch_size=5, progress=False)
    assert not torch.allclose(one_go.images, other.images, atol=1e-2)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_eta_is_refused_by_a_sampler_that_does_not_take_it(sampler):
    schedule = SCHEDULES["cosine"]
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        oracle = Oracle(schedule, torch.zeros(1, 1, 64, 64), "v")
        du.sample(oracle, schedule, 1, steps=2, sampler=sampler, eta=0.3, prediction="v", progress=False)


def test_steps_beyond_the_training_timesteps_are_refused_for_one_and_two_evaluation_samplers():
    schedule = SCHEDULES["cosine"]
    oracle = Oracle(schedule, torch.zeros(1, 1, 64, 64), "v")
    with pytest.raises(ValueError, match="steps=1001 needs 1001 timesteps of dpm\\+\\+, more than the 1000 of"):
        du.sample(oracle, schedule, 1, steps=1001, sampler="dpm++", prediction="v", progress=False)
    with pytest.raises(ValueError, match="steps=2000 needs 1001 timesteps of heun, more than the 1000 of training"):
        du.sample(oracle, schedule, 1, steps=2000, sampler="heun", prediction="v", progress=False)


def test_initial_noise_replaces_the_seeded_start(x0):
    schedule = SCHEDULES["cosine"]
    oracle = Oracle(schedule, x0, "v")
    start = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(9))
    result = du.sample(
        oracle, schedule, 3, steps=3, sampler="ddim", prediction="v", initial_noise=start, save_at=[0], progress=False
    )
    assert torch.equal(result.x_t[0], start)
    with pytest.raises(ValueError, match=r"initial_noise must have shape \(3, 1, 64, 64\)"):
        du.sample(oracle, schedule, 3, steps=3, prediction="v", initial_noise=start[:2], progress=False)


# ------------------------------------------------------------------------------------------
# The log-SNR grid and spherical interpolation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 100, 999, 1000])
def test_the_log_snr_grid_is_distinct_starts_at_pure_noise_and_ends_at_the_cleanest_step(steps):
    schedule = SCHEDULES["cosine"]
    kept = du.SPACINGS["logsnr"](schedule, steps)
    assert len(kept) == steps and int(kept[-1]) == T - 1 and int(kept[0]) == 0
    assert bool((kept[1:] > kept[:-1]).all())


def test_the_log_snr_grid_spaces_lambda_evenly_where_timesteps_allow():
    """Away from the clipped last beta, each kept timestep is the one nearest to its evenly spaced lambda."""
    schedule = SCHEDULES["cosine"]
    kept = du.SPACINGS["logsnr"](schedule, 5)
    lam = 0.5 * schedule.snr.log()
    targets = torch.linspace(float(lam[0]), float(lam[-1]), 5, dtype=torch.float64)
    for k in range(4):
        assert int(kept[k]) == int((lam - targets[k]).abs().argmin())


def test_slerp_keeps_the_norm_and_hits_both_ends():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 64, 64, generator=generator), torch.randn(1, 1, 64, 64, generator=generator)
    assert torch.allclose(du.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(du.slerp(a, b, 1.0), b, atol=1e-5)
    middle = du.slerp(a, b, 0.5)
    assert float(middle.norm()) == pytest.approx(float((a.norm() + b.norm()) / 2), rel=0.02)
    assert float(((a + b) / 2).norm()) < 0.8 * float(middle.norm())  # the straight line cuts inside the sphere


# ------------------------------------------------------------------------------------------
# Heun's method (Karras et al. 2022): two network evaluations per step, counted as such
# ------------------------------------------------------------------------------------------


def gaussian_denoiser(schedule: du.NoiseSchedule, mean: float, sd: float):
    """The exact x0_hat = E[x_0 | x_t] when the data are N(mean, sd^2): a perfect denoiser we can write down."""

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        ab = float(schedule.alpha_bars[i])
        a = math.sqrt(ab)
        return mean + sd * sd * a / (ab * sd * sd + 1 - ab) * (x - a * mean)

    return denoise


def exact_flow(schedule: du.NoiseSchedule, x_T: torch.Tensor, mean: float, sd: float, i: int) -> torch.Tensor:
    """The probability-flow ODE's exact solution at index i for Gaussian data, started at the last index.

    With x~ = x / alpha, sigma~ = sigma / alpha: dx~/dsigma~ = (x~ - x0_hat) / sigma~ = (x~ - mean) sigma~ / (sd^2 +
    sigma~^2), so x~ - mean grows as sqrt(sd^2 + sigma~^2)."""

    def scaled(index: int) -> tuple[float, float]:
        ab = float(schedule.alpha_bars[index])
        return math.sqrt(ab), math.sqrt((1 - ab) / ab)

    (a_T, s_T), (a, s) = scaled(len(schedule) - 1), scaled(i)
    ratio = math.sqrt(sd * sd + s * s) / math.sqrt(sd * sd + s_T * s_T)
    return a * (mean + (x_T / a_T - mean) * ratio)


def solve(step, schedule: du.NoiseSchedule, x_T: torch.Tensor, denoise) -> torch.Tensor:
    """Steps from the last index down to index 0's noise level (not to sigma = 0, where Heun falls back to Euler)."""
    x, run = x_T, state(evaluations=2 * len(schedule) - 1)
    for i in range(len(schedule) - 1, 0, -1):
        x = step(schedule, i, x, denoise, run)
    return x


def test_heun_is_second_order_and_ddim_first_order_on_an_exact_ode():
    """Doubling the steps divides Heun's error by about 4 and Euler's (DDIM's) by about 2."""
    mean, sd, x_T = 0.3, 0.5, torch.full((1, 1, 1, 1), 1.7, dtype=torch.float64)
    errors = {"heun": [], "ddim": []}
    for steps in (17, 33, 65):
        spaced = SCHEDULES["cosine"].respaced(steps, "logsnr")
        exact = exact_flow(spaced, x_T, mean, sd, 0)
        for name, step in (("heun", du.heun_step), ("ddim", du.ddim_step)):
            errors[name].append(float((solve(step, spaced, x_T, gaussian_denoiser(spaced, mean, sd)) - exact).abs()))
    heun, ddim = np.array(errors["heun"]), np.array(errors["ddim"])
    assert np.all(heun[:-1] / heun[1:] > 3.3), heun
    assert np.all((ddim[:-1] / ddim[1:] > 1.6) & (ddim[:-1] / ddim[1:] < 2.5)), ddim
    assert heun[-1] < ddim[-1] / 5


def test_one_heun_step_by_hand():
    spaced = SCHEDULES["cosine"].respaced(5)
    x_t, x0_hat = (
        torch.full((1, 1, 2, 2), 0.4, dtype=torch.float64),
        torch.full((1, 1, 2, 2), -0.6, dtype=torch.float64),
    )
    i = 3
    ab, ab_prev = float(spaced.alpha_bars[i]), float(spaced.alpha_bars[i - 1])
    s, s_prev = math.sqrt((1 - ab) / ab), math.sqrt((1 - ab_prev) / ab_prev)
    d = (0.4 / math.sqrt(ab) - -0.6) / s
    euler = 0.4 / math.sqrt(ab) + (s_prev - s) * d
    d_next = (euler - -0.6) / s_prev
    expected = math.sqrt(ab_prev) * (0.4 / math.sqrt(ab) + (s_prev - s) * (d + d_next) / 2)
    denoise = constant_denoiser(x0_hat)
    got = du.heun_step(spaced, i, x_t, denoise, state(evaluations=9))
    torch.testing.assert_close(got, torch.full_like(x_t, expected), rtol=0, atol=1e-12)
    assert denoise.calls == [i, i - 1]  # its own index, then the next one at the Euler point


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 11])
def test_heuns_steps_count_network_evaluations(steps, x0):
    """steps = network evaluations per image for every sampler: Heun corrects as many steps as the budget pays for.
    Where it corrects none it is the DDIM step, i.e. the Euler step of the probability-flow ODE."""
    schedule = SCHEDULES["cosine"]
    oracle = Oracle(schedule, x0, "v")
    result = du.sample(oracle, schedule, 3, steps=steps, sampler="heun", prediction="v", progress=False)
    assert len(oracle.seen) == steps
    assert len({int(t[0]) for t in oracle.seen}) == du.SAMPLERS["heun"].grid_steps(steps) == steps // 2 + 1
    assert (result.images - x0).abs().max() < 1e-5


def test_heun_without_a_correction_is_the_ddim_step():
    spaced = SCHEDULES["cosine"].respaced(6, "logsnr")
    generator = torch.Generator().manual_seed(4)
    x_t, x0_hat = torch.randn(2, 1, 8, 8, generator=generator), torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    for i in range(6):
        heun = du.heun_step(spaced, i, x_t, constant_denoiser(x0_hat), state(evaluations=6))  # 6 - 6: no correction
        ddim = du.ddim_step(spaced, i, x_t, constant_denoiser(x0_hat), state())
        torch.testing.assert_close(heun, ddim, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Few-step grids and clipping rules (diagnosing the deterministic samplers)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["time", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50])
def test_a_trailing_grid_starts_at_pure_noise_and_leaves_out_the_cleanest_point(base, steps):
    schedule = SCHEDULES["cosine"]
    plain, trailing = du.SPACINGS[base](schedule, steps + 1), du.SPACINGS[f"{base}-trailing"](schedule, steps)
    assert trailing.tolist() == plain[1:].tolist() and len(trailing) == steps
    assert int(trailing[-1]) == T - 1 and bool((trailing[1:] > trailing[:-1]).all())
    if steps > 1:
        assert int(du.SPACINGS[base](schedule, steps)[0]) == 0 and int(trailing[0]) > 0  # the plain grid wastes it


def test_at_two_steps_the_trailing_time_grid_takes_the_midpoint():
    assert du.SPACINGS["time-trailing"](SCHEDULES["cosine"], 2).tolist() == [500, 999]
    assert du.SPACINGS["time"](SCHEDULES["cosine"], 2).tolist() == [0, 999]
    assert len(du.SPACINGS["time-trailing"](SCHEDULES["cosine"], T)) == T  # as many steps as timesteps: all of them


def test_the_clip_rules_by_hand():
    x0_hat = torch.tensor([[[[-3.0, -0.5, 0.5, 2.0]]]])
    rules = du.CLIP_RULES
    assert rules["clip"](x0_hat, 5).flatten().tolist() == [-1.0, -0.5, 0.5, 1.0]
    assert rules["none"](x0_hat, 0).flatten().tolist() == [-3.0, -0.5, 0.5, 2.0]
    assert rules["last"](x0_hat, 5).flatten().tolist() == [-3.0, -0.5, 0.5, 2.0]  # left alone until the last step
    assert rules["last"](x0_hat, 0).flatten().tolist() == [-1.0, -0.5, 0.5, 1.0]
    s = float(torch.tensor([3.0, 0.5, 0.5, 2.0]).quantile(0.995))  # the 99.5th percentile of |x0_hat|
    expected = (x0_hat.clamp(-s, s) / s).flatten().tolist()
    assert rules["dynamic"](x0_hat, 5).flatten().tolist() == pytest.approx(expected)
    inside = torch.tensor([[[[-0.9, 0.2, 0.8, 0.1]]]])
    assert torch.equal(rules["dynamic"](inside, 5), inside)  # s is at least 1: an estimate in range is untouched


@pytest.mark.parametrize("rule", ["clip", "dynamic", "last", "none", True, False])
def test_every_clip_rule_keeps_a_perfect_predictor_exact(rule, x0):
    schedule = SCHEDULES["cosine"]
    oracle = Oracle(schedule, x0, "v")
    result = du.sample(oracle, schedule, 3, steps=5, sampler="dpm++", prediction="v", clip_x0=rule, progress=False)
    assert (result.images - x0).abs().max() < 1e-5
    with pytest.raises(ValueError, match="unknown clip_x0 'sometimes'"):
        du.sample(oracle, schedule, 3, steps=5, prediction="v", clip_x0="sometimes", progress=False)
