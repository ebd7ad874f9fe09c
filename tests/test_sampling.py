"""Section 6: DDPM and DDIM sampling, checked against an oracle network that knows x_0."""

import math

import pytest
import torch
from helpers import Oracle, constant_denoiser, state, tiny_model_config

import diffusion_utils as du

T = 1000
SCHEDULES = {kind: du.NoiseSchedule.create(kind, T) for kind in du.SCHEDULES}


@pytest.fixture(scope="module")
def x0():
    return du.make_shapes(3, seed=11).images


@pytest.fixture(scope="module")
def tiny_net():
    """A random tiny U-Net whose zero-initialised convs were perturbed, so its output depends on x and t."""
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config()).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, du.ResidualBlock):
                module.conv2.weight.copy_(torch.randn(module.conv2.weight.shape, generator=generator) * 0.05)
    return model


def initial_noise(seed: int, k: int) -> torch.Tensor:
    """x_T of image k: sample() seeds one generator per image with seed * 1_000_003 + k."""
    return torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(seed * 1_000_003 + k))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_with_the_oracle_recovers_x0(kind, prediction, x0):
    schedule = SCHEDULES[kind]
    oracle = Oracle(schedule, x0, prediction)
    result = du.sample(oracle, schedule, 3, steps=20, sampler="ddim", prediction=prediction, progress=False)
    assert result.images.shape == (3, 1, 64, 64)
    assert (result.images - x0).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_with_the_oracle_recovers_x0(kind, prediction, x0):
    schedule = SCHEDULES[kind]
    oracle = Oracle(schedule, x0, prediction)
    result = du.sample(
        oracle, schedule, 3, steps=20, sampler="ddpm", prediction=prediction, save_at=(10, 19), progress=False
    )
    assert (result.images - x0).abs().max() < 1e-5
    for predicted in result.x0_hat:  # the x_0 guesses along the way are x_0 as well
        assert (predicted - x0).abs().max() < 1e-4


def test_ddim_with_the_oracle_keeps_the_initial_noise_along_the_whole_path(x0):
    """With the exact eps, a deterministic DDIM step maps x_t = a x0 + s eps to a' x0 + s' eps:
    every x_t on the path uses the same eps, the one implied by x_T."""
    schedule = SCHEDULES["linear"]
    steps = 10
    result = du.sample(
        Oracle(schedule, x0, "eps"),
        schedule,
        3,
        steps=steps,
        sampler="ddim",
        prediction="eps",
        save_at=range(steps),
        progress=False,
    )
    x_T = torch.stack([initial_noise(0, k) for k in range(3)])
    assert torch.equal(result.x_t[0], x_T)
    ab_T = float(schedule.alpha_bars[-1])
    eps = (x_T.double() - math.sqrt(ab_T) * x0.double()) / math.sqrt(1 - ab_T)
    for t, x_t in zip(result.timesteps, result.x_t):
        ab = float(schedule.alpha_bars[t])
        assert torch.allclose(x_t.double(), math.sqrt(ab) * x0.double() + math.sqrt(1 - ab) * eps, atol=1e-4), t


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", None), ("ddim", 0.5), ("ddim", 1.0)])
def test_stochastic_steps_with_the_oracle_keep_x_t_distributed_as_q(sampler, eta, x0):
    """If x_t ~ q(x_t | x_0) and x_{t-1} ~ q(x_{t-1} | x_t, x_0), then x_{t-1} ~ q(x_{t-1} | x_0)
    (and DDIM keeps these marginals for any eta): (x_t - sqrt(ab) x_0) / sqrt(1 - ab) is N(0, 1)
    at every step. A wrong posterior mean or variance shifts or scales it."""
    schedule = SCHEDULES["linear"]  # alpha_bar_T = 4e-5: x_T ~ N(0, I) is q(x_T | x_0) to 1e-2
    steps = 8
    result = du.sample(
        Oracle(schedule, x0, "eps"),
        schedule,
        3,
        steps=steps,
        sampler=sampler,
        eta=eta,
        prediction="eps",
        save_at=range(steps),
        seed=4,
        progress=False,
    )
    for t, x_t in zip(result.timesteps, result.x_t):
        ab = float(schedule.alpha_bars[t])
        z = (x_t.double() - math.sqrt(ab) * x0.double()) / math.sqrt(1 - ab)  # 3 x 4096 draws
        assert abs(float(z.mean())) < 0.05, t
        assert float(z.std()) == pytest.approx(1.0, abs=0.03), t


def test_the_network_sees_the_training_timesteps_from_t_minus_1_down_to_0(x0):
    schedule = SCHEDULES["cosine"]
    for steps, expected in [(4, [999, 666, 333, 0]), (1, [999]), (2, [999, 0])]:
        oracle = Oracle(schedule, x0, "v")
        du.sample(oracle, schedule, 3, steps=steps, sampler="ddim", spacing="time", prediction="v", progress=False)
        assert [t.tolist() for t in oracle.seen] == [[t] * 3 for t in expected]
    trailing = Oracle(schedule, x0, "v")  # ddim's own grid leaves out the nearly clean index 0
    du.sample(trailing, schedule, 3, steps=4, sampler="ddim", prediction="v", progress=False)
    assert [int(t[0]) for t in trailing.seen] == [999, 749, 500, 250]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_with_eta_1_is_the_ddpm_step(kind):
    spaced = SCHEDULES[kind].respaced(10)
    generator = torch.Generator().manual_seed(2)
    for i in range(10):
        x_t, noise = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
        x0 = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
        ddim = du.ddim_step(spaced, i, x_t, constant_denoiser(x0), state(noise, eta=1.0))
        ddpm = du.ddpm_step(spaced, i, x_t, constant_denoiser(x0), state(noise))
        assert torch.allclose(ddim, ddpm, atol=1e-5), i


def test_ddim_step_with_eta_0_by_hand():
    spaced = SCHEDULES["cosine"].respaced(5)
    x_t, x0 = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.5)
    i = 3
    ab, ab_prev = float(spaced.alpha_bars[i]), float(spaced.alpha_bars[i - 1])
    eps = (0.3 - math.sqrt(ab) * -0.5) / math.sqrt(1 - ab)
    expected = math.sqrt(ab_prev) * -0.5 + math.sqrt(1 - ab_prev) * eps
    denoise = constant_denoiser(x0)
    assert torch.allclose(du.ddim_step(spaced, i, x_t, denoise, state()), torch.full_like(x_t, expected), atol=1e-6)
    assert torch.equal(du.ddim_step(spaced, 0, x_t, denoise, state()), x0)  # the last step lands on x_0
    assert denoise.calls == [i, 0]  # one network evaluation per step, at the step's own index


def test_ddpm_step_by_hand():
    spaced = SCHEDULES["linear"].respaced(5)
    x_t, x0, z = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.5), torch.full((1, 1, 2, 2), 2.0)
    i = 2
    mean = float(spaced.posterior_mean_coef1[i]) * -0.5 + float(spaced.posterior_mean_coef2[i]) * 0.3
    expected = mean + math.sqrt(float(spaced.posterior_variance[i])) * 2.0
    denoise = constant_denoiser(x0)
    assert torch.allclose(du.ddpm_step(spaced, i, x_t, denoise, state(z)), torch.full_like(x_t, expected), atol=1e-6)
    zero = torch.zeros_like(z)
    assert torch.allclose(du.ddpm_step(spaced, i, x_t, denoise, state(zero)), torch.full_like(x_t, mean), atol=1e-6)
    assert torch.allclose(du.ddpm_step(spaced, 0, x_t, denoise, state()), x0, atol=1e-6)  # no noise at the last step


def test_whole_ddpm_run_equals_ddim_with_eta_1(tiny_net):
    schedule = SCHEDULES["cosine"]
    ddpm = du.sample(tiny_net, schedule, 2, steps=5, sampler="ddpm", seed=3, progress=False)
    ddim = du.sample(tiny_net, schedule, 2, steps=5, sampler="ddim", spacing="time", eta=1.0, seed=3, progress=False)
    assert torch.allclose(ddpm.images, ddim.images, atol=1e-4)


def test_same_seed_same_samples_different_seed_different(tiny_net):
    schedule = SCHEDULES["cosine"]
    for sampler, eta in [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5)]:
        a = du.sample(tiny_net, schedule, 2, steps=4, sampler=sampler, eta=eta, seed=5, progress=False)
        b = du.sample(tiny_net, schedule, 2, steps=4, sampler=sampler, eta=eta, seed=5, progress=False)
        c = du.sample(tiny_net, schedule, 2, steps=4, sampler=sampler, eta=eta, seed=6, progress=False)
        assert torch.equal(a.images, b.images)
        assert (a.images - c.images).abs().max() > 0.1
        assert float(a.images.min()) >= -1 and float(a.images.max()) <= 1


def test_ddim_eta_0_is_deterministic_given_x_T_and_eta_adds_noise(tiny_net):
    schedule = SCHEDULES["cosine"]
    eta0 = du.sample(tiny_net, schedule, 2, steps=4, sampler="ddim", eta=0.0, seed=5, progress=False)
    default = du.sample(tiny_net, schedule, 2, steps=4, sampler="ddim", seed=5, progress=False)
    noisy = du.sample(tiny_net, schedule, 2, steps=4, sampler="ddim", eta=0.8, seed=5, progress=False)
    assert torch.equal(eta0.images, default.images)  # eta defaults to 0 for ddim
    assert not torch.equal(eta0.images, noisy.images)


def test_save_at_keeps_the_requested_steps(tiny_net):
    schedule = SCHEDULES["cosine"]
    result = du.sample(tiny_net, schedule, 2, steps=4, sampler="ddpm", save_at=(3, 0, 2), progress=False)
    assert result.timesteps == [999, 333, 0]  # sorted step order: step 0 is T-1, step 3 is 0
    assert len(result.x_t) == len(result.x0_hat) == 3
    assert all(x.shape == (2, 1, 64, 64) for x in result.x_t + result.x0_hat)
    assert torch.equal(result.x_t[0], torch.stack([initial_noise(0, k) for k in range(2)]))  # step 0 sees x_T
    assert all(float(x.abs().max()) <= 1 for x in result.x0_hat)  # x_0 guesses are clipped
    none = du.sample(tiny_net, schedule, 2, steps=4, progress=False)
    assert none.timesteps == [] and none.x_t == [] and none.x0_hat == []
    assert torch.equal(none.images, result.images)  # saving does not change the samples


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_chunking_does_not_change_the_images(tiny_net, sampler):
    schedule = SCHEDULES["cosine"]
    whole = du.sample(
        tiny_net, schedule, 5, steps=3, sampler=sampler, seed=2, batch_size=5, save_at=(1,), progress=False
    )
    chunked = du.sample(
        tiny_net, schedule, 5, steps=3, sampler=sampler, seed=2, batch_size=2, save_at=(1,), progress=False
    )
    assert torch.allclose(whole.images, chunked.images, atol=1e-5)
    assert torch.allclose(whole.x_t[0], chunked.x_t[0], atol=1e-5) and chunked.x_t[0].shape == (5, 1, 64, 64)
    first_two = du.sample(tiny_net, schedule, 2, steps=3, sampler=sampler, seed=2, progress=False)
    assert torch.allclose(first_two.images, whole.images[:2], atol=1e-5)  # image k does not depend on n


def test_prediction_comes_from_the_model_config(tiny_net, x0):
    schedule = SCHEDULES["cosine"]
    explicit = du.sample(tiny_net, schedule, 1, steps=2, prediction="v", progress=False)
    implicit = du.sample(tiny_net, schedule, 1, steps=2, progress=False)
    other = du.sample(tiny_net, schedule, 1, steps=2, prediction="eps", progress=False)
    assert tiny_net.config.prediction == "v"
    assert torch.equal(explicit.images, implicit.images) and not torch.equal(explicit.images, other.images)
    with pytest.raises(ValueError, match="prediction"):
        du.sample(Oracle(schedule, x0, "eps"), schedule, 1, steps=2, progress=False)


def test_sample_restores_the_model_mode_and_works_on_the_cpu(tiny_net):
    for training in (True, False):
        tiny_net.train(training)
        result = du.sample(tiny_net, SCHEDULES["cosine"], 1, steps=1, progress=False)
        assert tiny_net.training == training
        assert result.images.device.type == "cpu"


def test_sample_takes_a_precision_the_device_runs(tiny_net):
    default = du.sample(tiny_net, SCHEDULES["cosine"], 2, steps=2, seed=3, progress=False)
    asked = du.sample(tiny_net, SCHEDULES["cosine"], 2, steps=2, seed=3, precision="fp32", progress=False)
    assert torch.equal(default.images, asked.images)
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device; cpu runs in fp32"):
        du.sample(tiny_net, SCHEDULES["cosine"], 1, steps=1, precision="fp16", progress=False)
