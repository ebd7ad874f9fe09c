"""Sections 7 and 10: the sampler interface and DPM-Solver++(2M), against oracles no one here wrote.

tests/data/sampler_reference.npz holds Hugging Face diffusers' DPMSolverMultistepScheduler and DDIMScheduler
trajectories in float64 (written once by tests/make_sampler_reference.py; diffusers is not needed to run this).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Oracle, tiny_model_config

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
    state = du.StepState()
    for k, t in enumerate(timesteps.tolist()):
        i = len(timesteps) - 1 - k
        assert int(spaced.timesteps[i]) == t
        index = torch.full((len(x),), i)
        output = torch.from_numpy(reference[f"{case}_outputs"][k])
        x0 = spaced.predict_x0("v", x, output, index).clamp(-1, 1)
        torch.testing.assert_close(x0, torch.from_numpy(reference[f"{case}_x0_hat"][k]), rtol=0, atol=1e-8)
        x = sampler.step(spaced, i, x, x0, state)
        state.x0_history = state.x0_history[-1:] + [x0]
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
@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
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
        dpm = du.dpm_solver_step(spaced, i, x_t, x0, du.StepState())
        ddim = du.ddim_step(spaced, i, x_t, x0, du.StepState())
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
    got = du.dpm_solver_step(spaced, i, x_t, x0, du.StepState(x0_history=[previous]))
    torch.testing.assert_close(got, torch.full_like(x_t, expected), rtol=0, atol=1e-6)
    assert torch.equal(du.dpm_solver_step(spaced, 0, x_t, x0, du.StepState(x0_history=[previous])), x0)


# ------------------------------------------------------------------------------------------
# The interface: a registry, one step signature, seeds independent of the batch
# ------------------------------------------------------------------------------------------


def test_a_new_sampler_is_one_function_and_one_registry_line(x0, monkeypatch):
    monkeypatch.setattr(du, "SAMPLERS", dict(du.SAMPLERS))

    @du.register_sampler("jump", "straight to x0_hat")
    def jump(schedule, i, x_t, x0_hat, state):
        return x0_hat

    assert (
        du.SAMPLERS["jump"].step is jump
        and "jump" in du.build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    )
    schedule = SCHEDULES["cosine"]
    result = du.sample(Oracle(schedule, x0, "v"), schedule, 3, steps=3, sampler="jump", prediction="v", progress=False)
    assert (result.images - x0).abs().max() < 1e-5


def test_the_state_holds_the_previous_estimates_for_multistep_solvers(x0, monkeypatch):
    seen = []
    monkeypatch.setattr(du, "SAMPLERS", dict(du.SAMPLERS))

    @du.register_sampler("spy", "records its state")
    def spy(schedule, i, x_t, x0_hat, state):
        seen.append((i, len(state.x0_history), state.noise is None, state.eta))
        return du.ddim_step(schedule, i, x_t, x0_hat, state)

    schedule = SCHEDULES["cosine"]
    du.sample(Oracle(schedule, x0, "v"), schedule, 3, steps=4, sampler="spy", prediction="v", progress=False)
    assert seen == [(3, 0, True, 0.0), (2, 1, True, 0.0), (1, 2, True, 0.0), (0, 2, True, 0.0)]


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


def test_steps_beyond_the_training_timesteps_are_refused():
    schedule = SCHEDULES["cosine"]
    with pytest.raises(ValueError, match="num_steps must be <= the 1000 training timesteps, got 1001"):
        oracle = Oracle(schedule, torch.zeros(1, 1, 64, 64), "v")
        du.sample(oracle, schedule, 1, steps=1001, sampler="dpm++", prediction="v", progress=False)


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
