"""Section 3: the noise schedules, the forward process q(x_t | x_0) and the exact conversions."""

import math
import re

import pytest
import torch
from helpers import tiny_model_config, tiny_train_config
from hypothesis import given
from hypothesis import strategies as st

import diffusion_utils as du

T = 1000


@pytest.fixture(scope="module")
def linear():
    return du.NoiseSchedule.create("linear", T)


@pytest.fixture(scope="module")
def cosine():
    return du.NoiseSchedule.create("cosine", T)


LINEAR = du.NoiseSchedule.create("linear", T)  # for hypothesis tests, which cannot take fixtures
COSINE = du.NoiseSchedule.create("cosine", T)
SCHEDULES = {"linear": LINEAR, "cosine": COSINE}


def hand_linear_beta(t: int, timesteps: int = T) -> float:
    """Ho et al.: beta rises linearly from 1e-4 to 0.02 over 1000 steps (both scaled by 1000/T)."""
    start, end = 1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps
    return start + (end - start) * t / (timesteps - 1)


def hand_cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal: alpha_bar(u) = f(u) / f(0), f(u) = cos^2(((u/T + s) / (1 + s)) pi/2)."""
    f = lambda v: math.cos((v / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(u) / f(0)


# ------------------------------------------------------------------------------------------
# Closed-form values
# ------------------------------------------------------------------------------------------


def test_linear_betas_run_from_1e4_to_0_02_in_equal_steps(linear):
    assert len(linear) == T
    assert linear.betas.dtype == torch.float64
    assert float(linear.betas[0]) == pytest.approx(1e-4, rel=1e-12)
    assert float(linear.betas[-1]) == pytest.approx(0.02, rel=1e-12)
    steps = linear.betas.diff()
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-9, atol=0)


def test_linear_betas_are_scaled_for_other_lengths():
    betas = du.linear_betas(500)
    assert float(betas[0]) == pytest.approx(2e-4, rel=1e-12)
    assert float(betas[-1]) == pytest.approx(0.04, rel=1e-12)


@pytest.mark.parametrize("t", [0, 1, 9, 250, 499, 998, 999])
def test_linear_alpha_bar_is_the_product_of_one_minus_beta(linear, t):
    by_hand = math.prod(1 - hand_linear_beta(k) for k in range(t + 1))
    assert float(linear.alpha_bars[t]) == pytest.approx(by_hand, rel=1e-10)
    assert float(linear.alphas[t]) == pytest.approx(1 - hand_linear_beta(t), rel=1e-12)


def test_linear_alpha_bar_known_values(linear):
    # alpha_bar_0 = 1 - 1e-4 exactly; alpha_bar_1 = (1 - 1e-4)(1 - (1e-4 + 0.0199/999)).
    assert float(linear.alpha_bars[0]) == pytest.approx(0.9999, rel=1e-14)
    assert float(linear.alpha_bars[1]) == pytest.approx(0.9999 * (1 - (1e-4 + 0.0199 / 999)), rel=1e-14)
    # The well-known end point of the DDPM schedule: alpha_bar_T ~ 4.04e-5 (x_T is almost pure noise).
    assert float(linear.alpha_bars[-1]) == pytest.approx(4.036e-5, rel=1e-3)


@pytest.mark.parametrize("t", [0, 1, 10, 100, 500, 900, 990, 998])
def test_cosine_alpha_bar_matches_the_closed_form(cosine, t):
    # Index t holds alpha_bar after t + 1 noise steps: f(t + 1) / f(0). Only beta_999 is clipped.
    assert float(cosine.alpha_bars[t]) == pytest.approx(hand_cosine_alpha_bar(t + 1), rel=1e-9)


def test_cosine_betas_are_clipped_at_0_999_only_at_the_very_end(cosine):
    assert bool((cosine.betas > 0).all())
    assert bool((cosine.betas <= 0.999).all())
    assert float(cosine.betas[-1]) == 0.999  # 1 - f(T)/f(T-1) = 1 would make alpha_bar_T = 0
    assert bool((cosine.betas[:-1] < 0.999).all())
    expected = 1 - hand_cosine_alpha_bar(T - 1) * (1 - 0.999)
    assert float(cosine.alpha_bars[-1]) == pytest.approx(hand_cosine_alpha_bar(T - 1) * (1 - 0.999), rel=1e-9)
    assert 1 - float(cosine.alpha_bars[-1]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_alpha_bar_falls_from_about_1_to_about_0(schedule):
    ab = schedule.alpha_bars
    assert bool((ab.diff() < 0).all())
    assert 0.999 < float(ab[0]) < 1 and 0 < float(ab[-1]) < 1e-4
    assert torch.equal(schedule.alpha_bars_prev[1:], ab[:-1]) and float(schedule.alpha_bars_prev[0]) == 1.0
    assert torch.allclose(
        schedule.sqrt_alpha_bars**2 + schedule.sqrt_one_minus_alpha_bars**2,
        torch.ones(T, dtype=torch.float64),
        rtol=0,
        atol=1e-14,
    )


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_snr_is_alpha_bar_over_one_minus_alpha_bar(schedule):
    for t in (0, 1, 500, 999):
        ab = float(schedule.alpha_bars[t])
        assert float(schedule.snr[t]) == pytest.approx(ab / (1 - ab), rel=1e-12)
    assert bool((schedule.snr.diff() < 0).all())


def test_gather_reads_each_table_it_is_given_even_fresh_ones(cosine):
    """A table built afresh per call (as a loss-weight table in a loop) gets its own values, never a freed table's.

    A cache keyed by id() alone would serve a freed table's values: CPython gives a new tensor the freed one's id.
    """
    t, like = torch.tensor([0, 500, 999]), torch.zeros(3, 1, 2, 2)
    for value in range(40):  # more than the cache keeps, so it also starts again
        gathered = cosine.gather(torch.full((len(cosine),), float(value), dtype=torch.float64), t, like)
        assert gathered.shape == (3, 1, 1, 1) and torch.equal(gathered, torch.full_like(gathered, float(value)))
    assert torch.equal(cosine.gather(cosine.snr, t, like).flatten(), cosine.snr[t].float())


def test_schedule_rejects_bad_betas():
    for betas in (torch.tensor([]), torch.tensor([0.1, 0.0]), torch.tensor([0.5, 1.0]), torch.full((2, 2), 0.1)):
        with pytest.raises(ValueError, match="betas"):
            du.NoiseSchedule(betas)


# ------------------------------------------------------------------------------------------
# Posterior q(x_{t-1} | x_t, x_0)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 2, 100, 500, 999])
def test_posterior_coefficients_match_their_formulas(schedule, t):
    beta, alpha = float(schedule.betas[t]), 1 - float(schedule.betas[t])
    ab = float(schedule.alpha_bars[t])
    ab_prev = float(schedule.alpha_bars[t - 1]) if t > 0 else 1.0
    assert float(schedule.posterior_variance[t]) == pytest.approx(
        beta * (1 - ab_prev) / (1 - ab), rel=1e-10, abs=1e-300
    )
    assert float(schedule.posterior_mean_coef1[t]) == pytest.approx(beta * math.sqrt(ab_prev) / (1 - ab), rel=1e-10)
    assert float(schedule.posterior_mean_coef2[t]) == pytest.approx(
        (1 - ab_prev) * math.sqrt(alpha) / (1 - ab), rel=1e-10, abs=1e-300
    )


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_posterior_at_t0_is_x0_itself(schedule):
    # With alpha_bar_{-1} = 1 there is nothing left to denoise: mean = x_0, variance = 0.
    assert float(schedule.posterior_variance[0]) == 0.0
    assert float(schedule.posterior_mean_coef1[0]) == pytest.approx(1.0, rel=1e-9)
    assert float(schedule.posterior_mean_coef2[0]) == 0.0


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_posterior_is_the_product_of_the_two_gaussians(schedule):
    """Bayes, derived by hand for every t >= 1 at once:

    q(x_{t-1} | x_t, x_0) ~ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}),
    a Gaussian in x_{t-1} with precision a_t / b_t + 1 / (1 - ab_{t-1}) and
    mean = (sqrt(a_t) x_t / b_t + sqrt(ab_{t-1}) x_0 / (1 - ab_{t-1})) / precision.
    """
    betas = schedule.betas[1:]
    alphas = 1 - betas
    ab_prev = schedule.alpha_bars[:-1]
    precision = alphas / betas + 1 / (1 - ab_prev)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(T - 1, generator=generator, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(T - 1, generator=generator, dtype=torch.float64)
    mean = (alphas.sqrt() * x_t / betas + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
    ours = schedule.posterior_mean_coef1[1:] * x0 + schedule.posterior_mean_coef2[1:] * x_t
    assert torch.allclose(ours, mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(schedule.posterior_variance[1:], 1 / precision, rtol=1e-9, atol=0)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_posterior_mean_is_the_conditional_mean_of_the_forward_chain(schedule):
    """Second derivation: x_{t-1} = sqrt(ab_{t-1}) x_0 + sqrt(1 - ab_{t-1}) e1 and
    x_t = sqrt(a_t) x_{t-1} + sqrt(b_t) e2 are jointly Gaussian given x_0, with
    Cov(x_{t-1}, x_t) = sqrt(a_t)(1 - ab_{t-1}) and Var(x_t) = 1 - ab_t, so
    E[x_{t-1} | x_t, x_0] = sqrt(ab_{t-1}) x_0 + Cov / Var (x_t - sqrt(ab_t) x_0)
    and Var[x_{t-1} | x_t, x_0] = (1 - ab_{t-1}) - Cov^2 / Var.
    """
    t = torch.arange(1, T)
    ab, ab_prev, alphas = schedule.alpha_bars[t], schedule.alpha_bars[t - 1], schedule.alphas[t]
    cov, var = alphas.sqrt() * (1 - ab_prev), 1 - ab
    # coefficient of x_t, and of x_0 after expanding the bracket
    assert torch.allclose(schedule.posterior_mean_coef2[t], cov / var, rtol=1e-9, atol=0)
    assert torch.allclose(
        schedule.posterior_mean_coef1[t], ab_prev.sqrt() - cov / var * ab.sqrt(), rtol=1e-7, atol=1e-12
    )
    assert torch.allclose(schedule.posterior_variance[t], (1 - ab_prev) - cov**2 / var, rtol=1e-7, atol=1e-12)


def test_posterior_mean_matches_a_monte_carlo_regression(cosine):
    """Simulate the chain x_0 -> x_{t-1} -> x_t and regress x_{t-1} on x_t: slope coef2, intercept coef1 x_0."""
    generator = torch.Generator().manual_seed(1)
    n, x0 = 400_000, 0.6
    for t in (50, 400, 800):
        ab_prev, beta = float(cosine.alpha_bars[t - 1]), float(cosine.betas[t])
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(
            n, generator=generator, dtype=torch.float64
        )
        x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=generator, dtype=torch.float64)
        xc, yc = x_t - x_t.mean(), x_prev - x_prev.mean()
        slope = float((xc * yc).sum() / (xc * xc).sum())
        intercept = float(x_prev.mean() - slope * x_t.mean())
        residual = float((yc - slope * xc).var())
        assert slope == pytest.approx(float(cosine.posterior_mean_coef2[t]), abs=0.01)
        assert intercept == pytest.approx(float(cosine.posterior_mean_coef1[t]) * x0, abs=0.01)
        assert residual == pytest.approx(float(cosine.posterior_variance[t]), rel=0.02)


# ------------------------------------------------------------------------------------------
# Respacing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [2, 3, 10, 50, 999])
def test_respaced_keeps_alpha_bar_at_the_kept_steps(kind, steps):
    schedule = SCHEDULES[kind]
    spaced = schedule.respaced(steps)
    kept = spaced.timesteps
    assert len(spaced) == steps and kept.dtype == torch.int64
    assert int(kept[0]) == 0 and int(kept[-1]) == T - 1
    assert bool((kept.diff() > 0).all())
    gaps = kept.diff()
    assert int(gaps.max() - gaps.min()) <= 1  # evenly spaced up to rounding
    # float64 round-off only (1 - (1 - r) is exact to ~1e-16 absolute, cosine's last alpha_bar is 2e-9)
    assert torch.allclose(spaced.alpha_bars, schedule.alpha_bars[kept], rtol=1e-12, atol=1e-15)
    # beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}
    assert float(spaced.betas[1]) == pytest.approx(
        1 - float(schedule.alpha_bars[kept[1]] / schedule.alpha_bars[kept[0]]), rel=1e-12
    )


def test_respaced_by_t_is_the_original(cosine):
    spaced = cosine.respaced(T)
    assert torch.equal(spaced.timesteps, torch.arange(T))
    for name in ("betas", "alpha_bars", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "snr"):
        assert torch.allclose(getattr(spaced, name), getattr(cosine, name), rtol=1e-10, atol=1e-300), name


def test_respaced_to_one_step_starts_from_pure_noise(cosine):
    spaced = cosine.respaced(1)
    assert spaced.timesteps.tolist() == [T - 1]
    assert float(spaced.alpha_bars[0]) == pytest.approx(float(cosine.alpha_bars[-1]), rel=1e-12)


def test_respaced_twice_maps_to_training_timesteps(linear):
    twice = linear.respaced(100).respaced(10)
    assert set(twice.timesteps.tolist()) <= set(linear.respaced(100).timesteps.tolist())
    assert torch.allclose(twice.alpha_bars, linear.alpha_bars[twice.timesteps], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [0, -3, T + 1, 2.5, True, "10"])
def test_respaced_rejects_bad_step_counts(cosine, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        cosine.respaced(bad)


# ------------------------------------------------------------------------------------------
# Forward process statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_add_noise_has_the_mean_and_std_of_q(kind):
    schedule = SCHEDULES[kind]
    ts = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    values = torch.linspace(-1, 1, len(ts))
    n = 32
    x0 = values.repeat_interleave(n).view(-1, 1, 1, 1).expand(-1, 1, 64, 64).contiguous()  # n images per t
    t = ts.repeat_interleave(n)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = schedule.add_noise(x0, noise, t).view(len(ts), -1).double()
    samples = x_t.shape[1]  # 32 * 4096 draws per t
    for k, step in enumerate(ts.tolist()):
        ab = float(schedule.alpha_bars[step])
        std = math.sqrt(1 - ab)
        assert float(x_t[k].mean()) == pytest.approx(
            math.sqrt(ab) * float(values[k]), abs=5 * std / math.sqrt(samples) + 1e-6
        )
        assert float(x_t[k].std()) == pytest.approx(std, rel=0.02)


def test_add_noise_is_the_closed_form(cosine):
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 64, 64, generator=generator) * 2 - 1
    noise = torch.randn(3, 1, 64, 64, generator=generator)
    t = torch.tensor([0, 400, 999])
    x_t = cosine.add_noise(x0, noise, t)
    for k in range(3):
        ab = float(cosine.alpha_bars[t[k]])
        assert torch.allclose(x_t[k], math.sqrt(ab) * x0[k] + math.sqrt(1 - ab) * noise[k], atol=1e-6)


def test_sample_timesteps_are_uniform_and_seeded(cosine):
    t = cosine.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == T - 1
    assert float(t.double().mean()) == pytest.approx((T - 1) / 2, abs=10)
    assert torch.equal(t, cosine.sample_timesteps(20_000, torch.Generator().manual_seed(0)))


def test_shifted_timesteps_fall_three_quarters_in_the_noisier_half(cosine):
    """t = 3u / (1 + 2u) is below 1/2 exactly when u < 1/4, and at most 1/10 when u < 1/28: of 40,000 draws, a
    quarter in the cleaner half of the timesteps (standard error 0.2 points), a 28th in the cleanest tenth."""
    t = du.training_timesteps(cosine, 40_000, "shifted", torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) == T - 1
    assert float((t < T // 2).double().mean()) == pytest.approx(0.25, abs=0.01)
    assert float((t < T // 10).double().mean()) == pytest.approx(1 / 28, abs=0.004)


def test_a_ddpm_trainer_draws_its_timesteps_as_its_config_says():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(time_sampling="shifted"), device="cpu")
    x0, _ = next(trainer.batches())
    state, how = trainer.generator.get_state(), (trainer.model_config.prediction, trainer.loss_weights)
    with torch.no_grad():
        shifted, uniform = (
            du.diffusion_loss(
                trainer.model, trainer.schedule, x0, *how, torch.Generator().set_state(state), time_sampling=sampling
            )
            for sampling in ("shifted", "uniform")
        )
    assert float(trainer.train_step(x0)) == pytest.approx(float(shifted), rel=1e-5)
    assert float(shifted) != pytest.approx(float(uniform), rel=1e-3)


# ------------------------------------------------------------------------------------------
# Exact conversions between x_0, eps and v (property tests)
# ------------------------------------------------------------------------------------------


def _random_case(seed: int, ts: list[int]):
    generator = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(len(ts), 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1).clamp(-1, 1)
    noise = torch.randn(len(ts), 1, 8, 8, generator=generator, dtype=torch.float64)
    return x0, noise, torch.tensor(ts)


timesteps = st.lists(st.integers(0, T - 1), min_size=1, max_size=4)


@given(kind=st.sampled_from(["linear", "cosine"]), ts=timesteps, seed=st.integers(0, 2**31 - 1))
def test_predict_x0_inverts_the_forward_process(kind, ts, seed):
    schedule = SCHEDULES[kind]
    x0, noise, t = _random_case(seed, ts)
    x_t = schedule.add_noise(x0, noise, t)
    from_eps = schedule.predict_x0("eps", x_t, schedule.target("eps", x0, noise, t), t)
    from_v = schedule.predict_x0("v", x_t, schedule.target("v", x0, noise, t), t)
    # float64 data; the tables are float32, but the same rounded a, s are used both ways
    assert torch.allclose(from_eps, x0, rtol=0, atol=1e-9)
    assert torch.allclose(from_v, x0, rtol=0, atol=1e-6)  # a^2 + s^2 = 1 only to float32 precision


@given(kind=st.sampled_from(["linear", "cosine"]), ts=timesteps, seed=st.integers(0, 2**31 - 1))
def test_velocity_is_a_eps_minus_s_x0_and_gives_eps_back(kind, ts, seed):
    schedule = SCHEDULES[kind]
    x0, noise, t = _random_case(seed, ts)
    ab = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    v = schedule.v_target(x0, noise, t)
    assert torch.allclose(v, a * noise - s * x0, rtol=0, atol=1e-6)
    assert torch.equal(schedule.target("v", x0, noise, t), v)
    assert torch.equal(schedule.target("eps", x0, noise, t), noise)
    x_t = schedule.add_noise(x0, noise, t)
    assert torch.allclose(s * x_t + a * v, noise, rtol=0, atol=1e-6)  # eps = s x_t + a v


def test_target_rejects_unknown_predictions(cosine):
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="'score'"):
        cosine.target("score", x, x, torch.tensor([0]))


# ------------------------------------------------------------------------------------------
# Min-SNR-gamma loss weights
# ------------------------------------------------------------------------------------------


def weight(schedule: du.NoiseSchedule, prediction: str, t: torch.Tensor, gamma, form: str = "cap") -> torch.Tensor:
    """The weights of timesteps t, read from the schedule's (T,) table (in float32, like the training tables)."""
    return schedule.loss_weights(prediction, gamma, form)[t].float()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(kind, gamma):
    schedule = SCHEDULES[kind]
    t = torch.arange(T)
    snr = schedule.snr.float()
    eps = weight(schedule, "eps", t, gamma)
    v = weight(schedule, "v", t, gamma)  # the default form, "cap"
    v_paper = weight(schedule, "v", t, gamma, "paper")
    assert torch.allclose(eps, snr.clamp(max=gamma) / snr, rtol=1e-5)
    assert torch.equal(weight(schedule, "eps", t, gamma, "paper"), eps)  # for eps the forms agree
    assert torch.allclose(v, (snr + 1).clamp(max=gamma) / (snr + 1), rtol=1e-5)
    assert torch.allclose(v_paper, snr.clamp(max=gamma) / (snr + 1), rtol=1e-5)
    # by hand at the ends: SNR_0 is huge, so eps is weighted gamma / SNR_0, and at t = T-1 SNR < gamma
    assert float(eps[0]) == pytest.approx(gamma / float(schedule.snr[0]), rel=1e-5)
    assert float(v[0]) == pytest.approx(gamma / float(schedule.snr[0] + 1), rel=1e-5)
    assert float(eps[-1]) == pytest.approx(1.0, rel=1e-6)
    assert float(v_paper[-1]) == pytest.approx(float(schedule.snr[-1] / (schedule.snr[-1] + 1)), rel=1e-4)
    # "cap" leaves v's loss alone (weight exactly 1) wherever SNR + 1 <= gamma, and only lowers it elsewhere
    alone, clipped = schedule.snr + 1 <= gamma, schedule.snr + 1 > gamma * 1.001
    assert bool(alone.any()) == (gamma > 1) and bool((v[alone] == 1).all())
    assert bool((v[clipped] < 1).all()) and bool((v <= 1).all())
    assert torch.equal(weight(schedule, "v", t, None), torch.ones(T))
    assert torch.equal(weight(schedule, "eps", t, None), torch.ones(T))


def test_at_the_noisiest_step_paper_gives_v_weight_0_and_cap_gives_1(cosine):
    """At t = T-1 the cosine schedule's SNR is about 0: min(SNR, 5) / (SNR + 1) ~ 0, min(SNR + 1, 5) / (SNR + 1) = 1."""
    last = torch.tensor([T - 1])
    assert float(cosine.snr[-1]) < 1e-6
    assert float(weight(cosine, "v", last, 5.0, "paper")) < 1e-6
    assert float(weight(cosine, "v", last, 5.0, "cap")) == 1.0


def test_an_unknown_min_snr_form_is_named(cosine):
    with pytest.raises(ValueError, match="unknown min_snr_form 'x0'; choose one of cap, paper"):
        cosine.loss_weights("v", 5.0, "x0")


@pytest.mark.parametrize("form", ["cap", "paper"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_turns_the_target_error_into_a_clipped_x0_error(prediction, form, cosine):
    """||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2,
    so weight * target error = min(lam, gamma) * x0 error ("cap", lam = SNR or SNR + 1),
    or min(SNR, gamma) * x0 error ("paper"), for both targets."""
    gamma = 5.0
    x0, noise, t = _random_case(7, [0, 30, 200, 600, 999])
    x_t = cosine.add_noise(x0, noise, t)
    target = cosine.target(prediction, x0, noise, t)
    output = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    target_error = ((output - target) ** 2).mean(dim=(1, 2, 3))
    x0_error = ((cosine.predict_x0(prediction, x_t, output, t) - x0) ** 2).mean(dim=(1, 2, 3))
    weights = weight(cosine, prediction, t, gamma, form).double()
    lam = cosine.snr[t] if prediction == "eps" else cosine.snr[t] + 1
    x0_weight = (lam if form == "cap" else cosine.snr[t]).clamp(max=gamma)
    assert torch.allclose(weights * target_error, x0_weight * x0_error, rtol=1e-4)
