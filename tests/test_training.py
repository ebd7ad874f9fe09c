"""Section 5 (and 1): the loss, EMA, the Trainer, resuming, NaN handling, device and precision."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import same_state, tiny_model_config, tiny_train_config
from torch import nn

import diffusion_utils as du

# ------------------------------------------------------------------------------------------
# Device and precision
# ------------------------------------------------------------------------------------------


def test_choose_precision_per_device_and_capability():
    assert du.choose_precision("cpu") == "fp32"
    assert du.choose_precision(torch.device("cpu")) == "fp32"
    assert du.choose_precision("mps") == "fp32"
    assert du.choose_precision("cuda", capability=(7, 5)) == "fp16"  # T4: no native bf16
    assert du.choose_precision("cuda", capability=(7, 0)) == "fp16"
    assert du.choose_precision("cuda", capability=(8, 0)) == "fp32"  # A100: TF32 tensor cores beat bf16 autocast here
    assert du.choose_precision("cuda", capability=(8, 6)) == "fp32"
    assert du.choose_precision("cuda:1", capability=(9, 0)) == "fp32"  # H100


def test_is_ampere_or_newer_reads_the_compute_capability():
    assert not du.is_ampere_or_newer("cpu") and not du.is_ampere_or_newer("mps")
    assert not du.is_ampere_or_newer("cuda", capability=(7, 5))  # T4
    assert du.is_ampere_or_newer("cuda", capability=(8, 0)) and du.is_ampere_or_newer("cuda:1", capability=(9, 0))


def test_trainer_precision_can_be_overridden_but_only_where_it_exists():
    assert du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu").precision == "fp32"
    assert du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu", precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="unknown precision .half.; choose one of fp32, bf16, fp16"):
        du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu", precision="half")


def test_check_precision_allows_only_what_the_device_runs():
    assert du.check_precision("cpu", "fp32") == "fp32"
    assert (
        du.check_precision("cpu", None) == "fp32" and du.check_precision("cuda", None, capability=(7, 5)) == "fp16"
    )  # None: the pick
    assert du.check_precision("cuda", "bf16", capability=(8, 0)) == "bf16"
    assert du.check_precision("cuda", "fp16", capability=(7, 5)) == "fp16"  # T4: fp16 tensor cores
    with pytest.raises(ValueError, match=r"'bf16' needs a GPU of compute capability 8.0\+ .*this one is 7.5"):
        du.check_precision("cuda", "bf16", capability=(7, 5))
    with pytest.raises(ValueError, match="precision 'bf16' needs a CUDA device; mps runs in fp32"):
        du.check_precision("mps", "bf16")
    with pytest.raises(ValueError, match="unknown precision"):
        du.check_precision("cpu", "fp8")


def test_default_training_minutes_per_device_and_capability():
    assert du.default_training_minutes("cpu") == 7.5
    assert du.default_training_minutes("mps") == 7.5
    assert du.default_training_minutes("cuda", capability=(9, 0)) == 3  # H100: 98 % valid after 90 s
    assert du.default_training_minutes("cuda", capability=(8, 0)) == 3
    assert du.default_training_minutes("cuda:0", capability=(7, 5)) == 7  # T4


def test_pick_device():
    assert du.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert du.pick_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda'.*CUDA is not available"):
        du.pick_device("cuda")
    with pytest.raises(ValueError, match="'cuda:1'"):
        du.Trainer(tiny_model_config(), tiny_train_config(), device="cuda:1")


def test_asking_for_a_cuda_index_past_the_last_card_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert du.pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:1'.*only 1 CUDA device"):
        du.pick_device("cuda:1")


def test_autocast_is_a_no_op_in_fp32():
    with du.autocast_for(torch.device("cpu"), "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with du.autocast_for(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_default_and_original_configs():
    assert du.default_configs("cpu") == du.default_configs("cpu", du.DEFAULT_OBJECTIVE)
    cpu_model, cpu_train = du.default_configs("cpu", "diffusion")
    assert cpu_train.channels_last and cpu_model.pixel_unshuffle == 4 and cpu_model.bottleneck_attention
    assert cpu_model.base_channels == 24 and du.ModelConfig() == cpu_model  # the dataclass defaults: this recipe
    assert cpu_model.conditional and (cpu_train.lr, cpu_train.lr_schedule, cpu_train.condition_dropout) == (
        2e-3,
        "cosine",
        0.5,
    )
    assert dataclasses.replace(du.TrainConfig(), channels_last=True) == cpu_train
    gpu_model, gpu_train = du.default_configs("cuda", "diffusion")  # no GPU needed to read the recipe
    assert gpu_model.base_channels == 64 and gpu_train.batch_size == 256 and not gpu_train.channels_last
    model, train = du.original_design_configs()
    assert (model.schedule, model.prediction, model.time_injection) == ("linear", "eps", "bottleneck")
    assert train.min_snr_gamma is None and train.ema_decay is None
    assert not model.conditional and train.lr_schedule == "constant"
    assert model.base_channels == cpu_model.base_channels and model.channel_mults == cpu_model.channel_mults
    like_model, like_train = du.original_design_configs(like=(gpu_model, gpu_train))
    assert (like_model.base_channels, like_model.pixel_unshuffle, like_train.batch_size) == (64, 2, 256)
    assert (like_model.prediction, like_model.bottleneck_attention, like_train.ema_decay) == ("eps", False, None)
    _, from_prompts = du.original_design_configs(like=du.default_configs("cpu", "diffusion", "prompt"))
    assert from_prompts.time_sampling == "uniform"  # the notebook's model trains shifted; the original did not


# ------------------------------------------------------------------------------------------
# The loss and EMA
# ------------------------------------------------------------------------------------------


class Constant(nn.Module):
    """Outputs zeros: the per-image loss is then the mean square of the target."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_diffusion_loss_of_a_zero_output_is_the_weighted_target_power():
    schedule = du.NoiseSchedule.create("cosine", 1000)
    x0 = du.make_shapes(4, seed=0).images
    generator = torch.Generator().manual_seed(5)
    loss = du.diffusion_loss(Constant(), schedule, x0, "eps", None, torch.Generator().manual_seed(5))  # w = 1
    # replay the same draws: t first, then the noise
    t = schedule.sample_timesteps(4, generator)
    noise = torch.randn(x0.shape, generator=generator)
    assert float(loss) == pytest.approx(float((noise**2).mean()), rel=1e-6)
    cap, paper = schedule.loss_weights("v", 5.0, "cap"), schedule.loss_weights("v", 5.0, "paper")
    v_loss = du.diffusion_loss(Constant(), schedule, x0, "v", cap, torch.Generator().manual_seed(5))
    v = schedule.v_target(x0, noise, t)
    expected = (cap[t] * (v**2).mean(dim=(1, 2, 3))).mean()
    assert float(v_loss) == pytest.approx(float(expected), rel=1e-5)
    paper_loss = du.diffusion_loss(Constant(), schedule, x0, "v", paper, torch.Generator().manual_seed(5))
    paper_expected = (paper[t] * (v**2).mean(dim=(1, 2, 3))).mean()
    assert float(paper_loss) == pytest.approx(float(paper_expected), rel=1e-5) and float(paper_loss) < float(v_loss)


@pytest.mark.parametrize("form", ["cap", "paper"])
def test_the_trainer_weights_its_loss_with_its_min_snr_settings(form):
    """The first step's loss is diffusion_loss with the config's gamma and form, from the same draws."""
    trainer = du.Trainer(
        tiny_model_config(prediction="v", dropout=0.0),
        tiny_train_config(min_snr_gamma=2.0, min_snr_form=form),
        device="cpu",
    )
    x0, _ = next(trainer.batches())
    assert torch.equal(trainer.loss_weights, trainer.schedule.loss_weights("v", 2.0, form).float())  # computed once
    with torch.no_grad():
        expected = {
            f: float(
                du.diffusion_loss(
                    trainer.model,
                    trainer.schedule,
                    x0,
                    "v",
                    trainer.schedule.loss_weights("v", 2.0, f),
                    torch.Generator().set_state(trainer.generator.get_state()),
                )
            )
            for f in du.MIN_SNR_FORMS
        }
    assert expected["cap"] != pytest.approx(expected["paper"], rel=1e-3)  # these draws tell the forms apart
    assert float(trainer.train_step(x0)) == pytest.approx(expected[form], rel=1e-5)


def test_ema_warm_up_follows_its_formula():
    """ema = decay_k ema + (1 - decay_k) param, decay_k = min(decay, (1 + k) / (10 + k)): 0.1, 0.18..., then the cap."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = du.EMA(model, decay=0.5)
    assert ema.model is not model and not ema.model.weight.requires_grad
    expected = 0.0
    for k in range(20):
        with torch.no_grad():
            model.weight.fill_(float(k + 1))
        ema.update(model)
        decay = min(0.5, (1 + k) / (10 + k))
        expected = decay * expected + (1 - decay) * (k + 1)
        assert float(ema.model.weight) == pytest.approx(expected, rel=1e-6)
        if k == 0:
            assert float(ema.model.weight) == pytest.approx(0.1 * 0.0 + 0.9 * 1.0)  # first decay = 1/10
    assert ema.updates == 20


# ------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------


def test_a_short_run_lowers_the_loss():
    data = du.make_shapes(16, seed=0).images
    config = tiny_model_config(schedule="linear", prediction="eps")
    trainer = du.Trainer(
        config,
        tiny_train_config(batch_size=4, lr=3e-3, warmup_steps=0, ema_decay=None, log_every=10),
        device="cpu",
        data=data,
    )
    losses = trainer.train(steps=40, progress=False)
    assert len(losses) == 40 and trainer.step == 40 and trainer.images_seen == 160
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.6 * first, (first, last)  # measured: 0.68 -> 0.32


def test_same_seed_same_initial_weights_and_the_global_rng_is_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = du.Trainer(tiny_model_config(), tiny_train_config(seed=3), device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    b = du.Trainer(tiny_model_config(), tiny_train_config(seed=3), device="cpu")
    c = du.Trainer(tiny_model_config(), tiny_train_config(seed=4), device="cpu")
    assert same_state(a.model.state_dict(), b.model.state_dict())
    assert not same_state(a.model.state_dict(), c.model.state_dict())
    assert same_state(a.ema.model.state_dict(), a.model.state_dict())
    a.train(steps=2, progress=False)  # training draws from the trainer's own generator
    assert torch.equal(torch.get_rng_state(), state)


def lrs_used(trainer: du.Trainer, **train_kwargs) -> list[float]:
    """The learning rate each optimiser step of trainer.train(**train_kwargs) ran with."""
    used, real_step = [], trainer.train_step

    def recording(*args):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(*args)

    trainer.train_step = recording
    trainer.train(progress=False, **train_kwargs)
    return used


def test_lr_warms_up_linearly():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(lr=1e-3, warmup_steps=4), device="cpu")
    assert lrs_used(trainer, steps=6) == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3], rel=1e-9)
    config = tiny_train_config(lr=1e-3, warmup_steps=4)
    assert [du.learning_rate(config, k, 0.7) for k in range(6)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])


def test_sampling_model_is_the_ema_when_there_is_one():
    with_ema = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    without = du.Trainer(tiny_model_config(), tiny_train_config(ema_decay=None), device="cpu")
    assert with_ema.sampling_model is with_ema.ema.model
    assert without.ema is None and without.sampling_model is without.model


def test_ema_is_updated_once_per_step_with_the_warm_up_decay():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(steps=1, progress=False)
    assert trainer.ema.updates == 1
    after = trainer.model.state_dict()
    name = "stem.1.weight"
    assert not torch.equal(after[name], before[name])
    # first update: decay 1/10, so the EMA moves 90% of the way to the new weights
    assert torch.allclose(trainer.ema.model.state_dict()[name], 0.1 * before[name] + 0.9 * after[name], atol=1e-7)


def test_log_and_checkpoint_cadence(tmp_path, monkeypatch):
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(log_every=3), device="cpu")
    saved, logged = [], []
    monkeypatch.setattr(du, "save_checkpoint", lambda path, t: saved.append(t.step))
    trainer.train(
        steps=7,
        progress=False,
        checkpoint_path=tmp_path / "x.pt",
        checkpoint_every=2,
        on_log=lambda t: logged.append((t.step, len(t.losses))),
    )
    assert saved == [2, 4, 6, 7]  # every 2 steps, and at the end
    # the loss is read back (and checked) before every save; log_every counts from the last read-back
    assert logged == [(2, 2), (4, 4), (6, 6), (7, 7)]
    logged.clear()
    trainer.train(steps=7, progress=False, on_log=lambda t: logged.append((t.step, len(t.losses))))
    assert logged == [(10, 10), (13, 13), (14, 14)]  # every 3 steps, and at the end


def test_step_and_minute_budgets():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=2, minutes=60, progress=False)  # both given: the first hit ends training
    assert trainer.step == 2
    trainer.train(minutes=0.0005, progress=False)  # 30 ms: however many steps fit
    assert len(trainer.losses) == trainer.step >= 2


def test_training_in_chunks_reuses_one_batch_iterator_and_equals_one_go():
    """DataLoader workers start once per run, not once per train() call (chunked benchmarks)."""
    calls = []

    def counting(trainer):
        original = trainer.batches

        def batches():
            calls.append(trainer.step)
            return original()

        trainer.batches = batches
        return trainer

    chunked = counting(du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu"))
    chunked.train(steps=2, progress=False)
    chunked.train(steps=3, progress=False)
    assert calls == [0]  # the second call went on with the first call's iterator
    straight = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    straight.train(steps=5, progress=False)
    assert chunked.losses == straight.losses
    assert same_state(chunked.model.state_dict(), straight.model.state_dict())
    chunked.load_state_dict(straight.state_dict())  # a loaded state starts a fresh iterator at its step
    chunked.train(steps=1, progress=False)
    assert calls == [0, 5]


def _run(steps_then: list[int], tmp_path, data=None) -> du.Trainer:
    """Train in legs, saving and reloading the checkpoint between them."""
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(log_every=2), device="cpu", data=data)
    for leg, steps in enumerate(steps_then):
        if leg:
            trainer = du.load_trainer(tmp_path / "leg.pt", data=data)
        trainer.train(steps=steps, progress=False, checkpoint_path=tmp_path / "leg.pt")
    return trainer


@pytest.mark.parametrize("fixed_data", [False, True], ids=["procedural", "fixed"])
def test_resuming_is_bitwise_identical_to_training_in_one_go(tmp_path, fixed_data):
    data = du.make_shapes(12, seed=9).images if fixed_data else None
    resumed = _run([3, 2], tmp_path / "a", data)
    straight = _run([5], tmp_path / "b", data)
    assert resumed.step == straight.step == 5 and resumed.images_seen == straight.images_seen == 20
    assert same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert same_state(resumed.ema.model.state_dict(), straight.ema.model.state_dict())
    assert resumed.ema.updates == 5
    assert resumed.losses == straight.losses
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())


def test_state_dict_round_trip_in_memory():
    a = du.Trainer(tiny_model_config(), tiny_train_config(ema_decay=None), device="cpu")
    a.train(steps=2, progress=False)
    b = du.Trainer(tiny_model_config(), tiny_train_config(ema_decay=None, seed=8), device="cpu")
    b.load_state_dict(a.state_dict())
    assert same_state(a.model.state_dict(), b.model.state_dict())
    assert b.step == 2 and b.losses == a.losses
    assert b.plan == a.plan and b.plan.first_step == 0 and b.plan.steps == 2 and b.plan.seconds is None


# ------------------------------------------------------------------------------------------
# NaN / inf losses
# ------------------------------------------------------------------------------------------


def _poison_call(monkeypatch, call: int) -> None:
    """Make the call-th diffusion_loss of the test return NaN."""
    real, calls = du.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(None)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(du, "diffusion_loss", poisoned)


def test_nan_loss_stops_training_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(log_every=10), device="cpu")
    trainer.train(steps=4, progress=False, checkpoint_path=path)
    saved_bytes, saved_model = path.read_bytes(), {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison_call(monkeypatch, 1)  # global step 5
    with pytest.raises(du.NonFiniteLossError, match=r"the loss became nan at step 5;"):
        trainer.train(steps=10, progress=False, checkpoint_path=path, checkpoint_every=5)
    assert path.read_bytes() == saved_bytes  # the save at step 5 never happened
    assert len(trainer.losses) == 4
    monkeypatch.undo()
    reloaded = du.load_trainer(path)
    assert reloaded.step == 4 and same_state(reloaded.model.state_dict(), saved_model)
    assert all(bool(torch.isfinite(p).all()) for p in reloaded.model.parameters())


def test_nan_is_reported_at_its_own_step_even_when_found_later(monkeypatch):
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(log_every=10), device="cpu")
    _poison_call(monkeypatch, 2)
    with pytest.raises(du.NonFiniteLossError, match=r"at step 2;") as error:
        trainer.train(steps=4, progress=False)  # read back only at step 4
    assert trainer.step == 4
    assert isinstance(error.value, RuntimeError)


def test_a_huge_learning_rate_ends_in_a_non_finite_loss_error():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(lr=1e6, warmup_steps=0), device="cpu")
    with pytest.raises(du.NonFiniteLossError, match=r"the loss became (nan|inf|-inf) at step \d+; .*try a lower lr"):
        trainer.train(steps=20, progress=False)


def test_the_fused_cpu_optimiser_matches_the_loop_one_with_channels_last():
    """The Trainer's fused AdamW walks each tensor's memory directly; with channels_last weights
    it must still update exactly what PyTorch's per-tensor loop does."""
    config = tiny_train_config(channels_last=True)
    fused = du.Trainer(tiny_model_config(), config, "cpu")
    loop = du.Trainer(tiny_model_config(), config, "cpu")
    loop.optimizer = torch.optim.AdamW(
        loop.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False
    )
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert fused.model.stem[1].weight.is_contiguous(memory_format=torch.channels_last)
    # One step: Adam's first update is about lr * sign(grad) for every element, so an update
    # written to the wrong elements would differ by ~lr (1e-3 / 3 in warm-up), not by rounding.
    # (Later steps drift apart by up to 1e-3 in either layout: Adam amplifies rounding in the
    # gradients that are still near zero.)
    fused.train(steps=1, progress=False)
    loop.train(steps=1, progress=False)
    for (name, a), b in zip(fused.model.named_parameters(), loop.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    assert not same_state(
        fused.model.state_dict(), du.Trainer(tiny_model_config(), config, "cpu").model.state_dict()
    )  # it trained


def test_adamw_is_fused_on_cuda_and_cpu_and_left_to_pytorch_on_mps():
    assert du.fused_adamw(torch.device("cpu")) is True and du.fused_adamw(torch.device("cuda")) is True
    assert du.fused_adamw(torch.device("mps")) is None


# ------------------------------------------------------------------------------------------
# The learning-rate schedule over a known budget
# ------------------------------------------------------------------------------------------


def test_cosine_decay_follows_its_formula_over_a_step_budget():
    """lr_k = lr * min(1, (k+1)/(warmup+1)) * (1 + cos(pi p_k)) / 2, p_k = k / steps: the step and the plan alone."""
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(lr=1e-3, warmup_steps=2, lr_schedule="cosine"), "cpu")
    used = lrs_used(trainer, steps=8)
    expected = [1e-3 * min(1.0, (k + 1) / 3) * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert trainer.progress() == 1.0
    second = lrs_used(trainer, steps=4)  # a new budget is a new phase: its own decay, from the peak
    assert second == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rel=1e-9)


def test_the_constant_schedule_keeps_the_peak_after_the_warm_up():
    config = tiny_train_config(lr=2e-3, warmup_steps=1, lr_schedule="constant")
    assert [du.learning_rate(config, k, 0.9) for k in (0, 1, 50)] == [1e-3, 2e-3, 2e-3]


def test_a_minute_budget_decays_by_the_clock(monkeypatch):
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(lr_schedule="cosine", warmup_steps=0), "cpu")
    clock = iter(range(0, 10_000, 15))  # every reading of the clock is 15 s later
    monkeypatch.setattr(du.time, "monotonic", lambda: float(next(clock)))
    shares = []
    trainer.train(minutes=1, progress=False, on_log=lambda t: shares.append(t.progress()))
    assert trainer.step >= 1 and shares == sorted(shares) and all(0.0 < share for share in shares)
    assert trainer.plan.seconds == 60 and trainer.plan.seconds_spent >= 60 and trainer.progress() >= 1.0
    with pytest.raises(ValueError, match="this run's plan is complete at step"):
        trainer.train(progress=False)  # nothing left to continue


# ------------------------------------------------------------------------------------------
# The plan: an interrupted run resumed without a budget ends where the uninterrupted one does
# ------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for kill -9: the process dies; only what was saved survives."""


def test_a_step_run_killed_and_resumed_without_a_budget_ends_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    config = tiny_train_config(lr_schedule="cosine", warmup_steps=3, log_every=2)  # the decay over the plan
    straight = du.Trainer(tiny_model_config(), config, device="cpu")
    straight.train(steps=12, progress=False, checkpoint_path=tmp_path / "straight.pt", checkpoint_every=4)

    def kill_at_step_10(trainer):  # after the checkpoint of step 8: steps 9-10 are lost with the process
        if trainer.step == 10:
            raise Killed

    killed = du.Trainer(tiny_model_config(), config, device="cpu")
    with pytest.raises(Killed):
        killed.train(
            steps=12, progress=False, checkpoint_path=tmp_path / "run.pt", checkpoint_every=4, on_log=kill_at_step_10
        )
    resumed = du.load_trainer(tmp_path / "run.pt")
    assert resumed.step == 8 and resumed.plan == du.TrainingPlan(0, 12, None, resumed.plan.seconds_spent)
    resumed.train(progress=False, checkpoint_path=tmp_path / "run.pt")  # no budget: on to the plan's end
    assert resumed.step == straight.step == 12 and resumed.losses == straight.losses
    assert same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert same_state(resumed.ema.model.state_dict(), straight.ema.model.state_dict())
    moments, expected = resumed.optimizer.state_dict()["state"], straight.optimizer.state_dict()["state"]
    assert moments.keys() == expected.keys() and all(same_state(moments[k], expected[k]) for k in moments)
    assert du.read_checkpoint(tmp_path / "run.pt")["state"]["step"] == 12
    with pytest.raises(ValueError, match="this run's plan is complete at step 12"):
        du.load_trainer(tmp_path / "run.pt").train(progress=False)


def test_a_minutes_plan_resumes_with_the_time_it_has_left(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(du.time, "monotonic", lambda: now[0])

    def tick(trainer):  # each logged step takes 10 s of the clock
        now[0] += 10.0

    config = tiny_train_config(log_every=1)
    first = du.Trainer(tiny_model_config(), config, device="cpu")
    first.train(steps=3, minutes=1, progress=False, checkpoint_path=tmp_path / "run.pt", on_log=tick)
    assert first.step == 3  # the step budget came first; 30 s of the 60 were spent
    saved = du.read_checkpoint(tmp_path / "run.pt")["state"]["plan"]
    assert saved == {"first_step": 0, "steps": 3, "seconds": 60.0, "seconds_spent": 30.0}
    second = du.Trainer(tiny_model_config(), config, device="cpu")
    second.train(minutes=1, progress=False, checkpoint_path=tmp_path / "minutes.pt", on_log=tick)
    assert second.step == 6  # 6 steps of 10 s

    def tick_then_die_at_step_3(trainer):
        tick(trainer)
        if trainer.step == 3:
            raise Killed

    killed = du.Trainer(tiny_model_config(), config, device="cpu")
    with pytest.raises(Killed):
        killed.train(
            minutes=1,
            progress=False,
            checkpoint_path=tmp_path / "part.pt",
            checkpoint_every=2,
            on_log=tick_then_die_at_step_3,
        )
    resumed = du.load_trainer(tmp_path / "part.pt")
    assert resumed.step == 2 and resumed.plan.seconds_spent == 20.0  # as at the checkpoint; step 3's time is lost too
    resumed.train(progress=False, on_log=tick)  # no budget: the 40 s left
    assert resumed.step == 6 and resumed.plan.seconds_spent == 60.0 and resumed.losses == second.losses


def test_learning_rate_is_a_function_of_the_step_and_the_plan_alone():
    config = tiny_train_config(lr=1e-3, lr_schedule="cosine", warmup_steps=0)
    plan = du.TrainingPlan.of(first_step=100, steps=50)
    lrs = [du.learning_rate(config, step, plan.progress(step)) for step in (100, 125, 150)]
    assert lrs == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-12)


# ------------------------------------------------------------------------------------------
# Set up once: device, precision and kernels decided by one call; no process-wide switch left changed
# ------------------------------------------------------------------------------------------


def test_trainer_and_sample_each_set_up_once(monkeypatch):
    calls = []
    real = du.setup
    monkeypatch.setattr(du, "setup", lambda *args: calls.append(args) or real(*args))
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=2, progress=False)
    assert len(calls) == 1
    du.sample(trainer.sampling_model, trainer.schedule, 3, steps=2, batch_size=2, progress=False)
    assert len(calls) == 2  # one for the sampling call, whatever its chunks and steps


def test_tf32_is_switched_on_inside_the_compute_context_only_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    runtime = du.Runtime(torch.device("cuda"), "fp32", True)  # the flags are plain switches: no GPU needed
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with runtime.compute():
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), runtime.compute():
            raise RuntimeError("a failing step")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with du.Runtime(torch.device("cuda"), "bf16", True).compute():  # only fp32 maths uses TF32
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_training_and_sampling_leave_the_process_settings_as_they_were():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype())
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=1, progress=False)
    du.sample(trainer.sampling_model, trainer.schedule, 1, steps=2, progress=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype()) == before
