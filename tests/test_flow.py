"""Rectified flow as a schedule of the same family: its path, its loss, every sampler on it, and the weighting."""

import math

import numpy as np
import pytest
import torch
from helpers import FlowOracle, tiny_model_config, tiny_train_config

import diffusion_utils as du

T = 1000
FLOW = du.NoiseSchedule.create("flow", T)


@pytest.fixture(scope="module")
def x0():
    return du.make_shapes(3, seed=5).images


def test_the_flow_schedule_is_the_straight_path_in_variance_preserving_form():
    t = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    alpha, sigma = FLOW.sqrt_alpha_bars * FLOW.input_scales, FLOW.sqrt_one_minus_alpha_bars * FLOW.input_scales
    torch.testing.assert_close(alpha, 1 - t, rtol=0, atol=1e-12)  # c_t times the VP scales: (1 - t, t)
    torch.testing.assert_close(sigma, t, rtol=0, atol=1e-12)
    torch.testing.assert_close(FLOW.timesteps, (T - 1) * t)
    assert bool((FLOW.snr[1:] < FLOW.snr[:-1]).all())  # noisier with the index


def test_velocity_and_x0_targets_invert_exactly():
    generator = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.rand(4, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1,
        torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64),
    )
    for schedule in (FLOW, du.NoiseSchedule.create("cosine", T)):
        t = torch.tensor([0, 10, 500, 999])
        x_t = schedule.noised(x0, noise, t)
        for prediction in du.PREDICTIONS:
            target = schedule.target(prediction, x0, noise, t)
            torch.testing.assert_close(schedule.predict_x0(prediction, x_t, target, t), x0, rtol=0, atol=1e-9)


def test_the_x0_weights_of_the_targets_by_hand():
    snr = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    assert du.x0_weight_of("eps", snr).tolist() == [0.25, 1.0, 4.0]
    assert du.x0_weight_of("v", snr).tolist() == [1.25, 2.0, 5.0]
    assert du.x0_weight_of("x0", snr).tolist() == [1.0, 1.0, 1.0]
    assert du.x0_weight_of("velocity", snr).tolist() == [2.25, 4.0, 9.0]  # (1 + sqrt(SNR))^2 = 1 / t^2
    capped = du.NoiseSchedule.create("cosine", T).loss_weights("velocity", 5.0)
    lam = du.x0_weight_of("velocity", du.NoiseSchedule.create("cosine", T).snr)
    torch.testing.assert_close(capped, lam.clamp(max=5.0) / lam)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "heun"])
def test_with_a_perfect_velocity_every_sampler_returns_x0_on_the_flow(sampler, steps, x0):
    oracle = FlowOracle(x0)
    result = du.sample(oracle, FLOW, 3, steps=steps, sampler=sampler, prediction="velocity", progress=False)
    assert (result.images - x0).abs().max() < 1e-4
    times = torch.cat(oracle.seen)
    assert bool(((times > 0) & (times < T - 1)).all())  # (T - 1) t with t inside (0, 1)


def test_ddim_at_eta_0_is_exactly_euler_on_the_flows_ode():
    """x_{t'} = x_t + (t' - t) u(x_t, t) in the flow's own coordinates, step for step, for any velocity field."""
    torch.manual_seed(0)
    net = du.UNet(tiny_model_config(schedule="flow", prediction="velocity")).eval()
    steps = 6
    spaced = FLOW.respaced(steps)
    x_T = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    ddim = du.sample(
        net, FLOW, 2, steps=steps, sampler="ddim", spacing="time", initial_noise=x_T, clip_x0=False, progress=False
    )
    ts = [float(spaced.timesteps[i]) / (T - 1) for i in range(steps)]  # t at each index, from the cleanest
    with torch.no_grad():
        x = x_T * float(spaced.input_scales[-1])  # the flow's x at the first t
        for i in reversed(range(steps)):
            t, t_next = ts[i], (ts[i - 1] if i > 0 else 0.0)
            x = x + (t_next - t) * net(x, torch.full((2,), (T - 1) * t))
    assert (x.abs() > 1).any()  # a random network: the comparison is not hidden by the final clamp
    torch.testing.assert_close(ddim.images, x.clamp(-1, 1), rtol=0, atol=1e-4)


def test_flow_matching_loss_by_hand():
    """A network that outputs zeros has the loss mean((eps - x_0)^2), drawn from the same generator states."""

    class Zero(torch.nn.Module):
        def forward(self, x, time):
            self.time = time
            return torch.zeros_like(x)

    x0 = du.make_shapes(8, seed=2).images
    zero = Zero()
    loss = du.flow_matching_loss(zero, x0, "uniform", torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    t = torch.rand(8, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    assert float(loss) == pytest.approx(float(((noise - x0) ** 2).mean()), rel=1e-6)
    torch.testing.assert_close(zero.time, (T - 1) * t)


def test_logit_normal_times_have_standard_normal_logits():
    t = du.training_times(40_000, "logit-normal", torch.Generator().manual_seed(0))
    logits = torch.log(t / (1 - t))
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(float(logits.mean())) < 0.02 and abs(float(logits.std()) - 1) < 0.02
    uniform = du.training_times(40_000, "uniform", torch.Generator().manual_seed(0))
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.003


def test_logit_normal_times_rarely_train_the_noisiest_tenth_where_the_layout_is_decided():
    # P(t > 0.9) = P(m > logit(0.9)) = 1 - Phi(ln 9) = 0.0141 for m ~ N(0, 1); uniform t gives 0.1. Trained at those
    # times, a flow ignores where a request asks for its shape (RESULTS.md), so the default flow samples t uniformly.
    tail = 0.5 * math.erfc(math.log(9) / math.sqrt(2))
    assert tail == pytest.approx(0.0141, abs=1e-4)
    t = du.training_times(200_000, "logit-normal", torch.Generator().manual_seed(1))
    assert float((t > 0.9).float().mean()) == pytest.approx(tail, abs=0.001)
    assert float((du.training_times(200_000, "uniform", torch.Generator().manual_seed(1)) > 0.9).float().mean()) == (
        pytest.approx(0.1, abs=0.002)
    )


def test_shifted_times_are_the_uniform_ones_moved_towards_the_noise():
    # The same draws, mapped by t = s u / (1 + (s - 1) u): P(t > 0.9) = P(u > 0.9 / (s - 0.9 (s - 1))) = 0.25 at s = 3.
    u = du.training_times(200_000, "uniform", torch.Generator().manual_seed(2))
    t = du.training_times(200_000, "shifted", torch.Generator().manual_seed(2))
    assert du.TIME_SHIFT == 3
    torch.testing.assert_close(t, 3 * u / (1 + 2 * u))
    assert float((t > 0.9).float().mean()) == pytest.approx(0.25, abs=0.003)
    assert float(t.median()) == pytest.approx(0.75, abs=0.005)


def test_the_trainer_trains_the_flow_with_the_flow_loss():
    model, train = du.default_configs("cpu", "flow")
    assert (model.schedule, model.prediction, train.min_snr_gamma, train.time_sampling) == (
        "flow",
        "velocity",
        None,
        "uniform",  # not logit-normal: see the test above
    )
    trainer = du.Trainer(
        tiny_model_config(schedule="flow", prediction="velocity"),
        tiny_train_config(min_snr_gamma=None, time_sampling="logit-normal"),
        device="cpu",
    )
    x0, _ = next(trainer.batches())
    with torch.no_grad():
        expected = du.flow_matching_loss(
            trainer.model, x0, "logit-normal", torch.Generator().set_state(trainer.generator.get_state())
        )
    assert float(trainer.train_step(x0)) == pytest.approx(float(expected), rel=1e-5)


def test_settings_that_do_not_apply_to_the_objective_are_refused():
    with pytest.raises(ValueError, match="the flow trains on plain MSE: min_snr_gamma must be None"):
        du.Trainer(tiny_model_config(schedule="flow", prediction="velocity"), tiny_train_config(), device="cpu")
    with pytest.raises(ValueError, match="the flow schedule learns the velocity eps - x_0: prediction 'velocity'"):
        du.ModelConfig(schedule="flow", prediction="v")
    with pytest.raises(ValueError, match="unknown objective 'score'"):
        du.default_configs("cpu", "score")


def test_the_implied_weights_have_unit_area_and_the_flows_known_shapes():
    curves = du.implied_weights()
    grid = curves.pop("lambda")
    for name, weight in curves.items():
        assert np.trapezoid(weight, grid) == pytest.approx(1.0, rel=1e-9), name
    uniform = curves["rectified flow, uniform t"]
    slope = np.polyfit(grid, np.log(uniform), 1)[0]
    assert slope == pytest.approx(-0.5, abs=1e-9)  # w(lambda) ~ exp(-lambda / 2) (Kingma & Gao 2023)
    # logit-normal: w ~ exp(-lambda^2 / 8) / sigmoid(lambda / 2)^2, whose peak solves lambda / 4 + sigmoid(-lambda / 2)
    # = 0 (the derivative of its log), a rising function of lambda: bisection
    low, high = -10.0, 0.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mid / 4 + 1 / (1 + math.exp(mid / 2)) < 0 else (low, mid)
    peak = grid[np.argmax(curves["rectified flow, logit-normal t (SD3)"])]
    assert peak == pytest.approx(low, abs=0.05)
