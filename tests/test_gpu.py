"""The CUDA paths: mixed precision, no host-device syncs in a training step, checkpoints across
devices, seeded sampling. They need a GPU, so they are skipped in CI (a CPU machine) and run on
a GPU machine with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch
from helpers import same_state, tiny_model_config, tiny_train_config

import diffusion_utils as du

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pinned_batches(batch_size: int, count: int) -> list[torch.Tensor]:
    return [du.make_shapes(batch_size, seed=k).images.pin_memory() for k in range(count)]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_steps_on_cuda_lower_the_loss_in_every_precision(precision):
    if precision == "bf16" and not du.is_ampere_or_newer("cuda"):
        pytest.skip("bf16 is emulated before compute capability 8.0")
    trainer = du.Trainer(
        tiny_model_config(), tiny_train_config(batch_size=16, lr=3e-3, log_every=10), device="cuda", precision=precision
    )
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert trainer.optimizer.param_groups[0]["fused"] is True
    losses = trainer.train(steps=60, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_never_waits_for_the_gpu(precision):
    """The loop reads the loss back only every log_every steps: one step must make no host-device
    sync (torch raises on any when the sync debug mode is "error")."""
    if precision == "bf16" and not du.is_ampere_or_newer("cuda"):
        pytest.skip("bf16 is emulated before compute capability 8.0")
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(batch_size=8), device="cuda", precision=precision)
    batches = pinned_batches(8, 3)
    trainer.train_step(batches[0])  # first step: lazy initialisation (cuBLAS handles, optimiser state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_channels_last_computes_the_same_loss_and_gradients_on_cuda(monkeypatch):
    """Same weights, same batch, same noise: the memory format changes kernels, not the maths
    (fp32 with TF32 off). Weights after Adam steps are not compared: Adam turns a rounding-size
    gradient difference into a full lr-sized step wherever a gradient is near zero."""
    x0 = du.make_shapes(8, seed=0).images.cuda()
    grads = []
    for channels_last in (False, True):
        trainer = du.Trainer(
            tiny_model_config(),
            tiny_train_config(batch_size=8, channels_last=channels_last),
            device="cuda",
            precision="fp32",
        )
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # exact fp32 maths for this comparison
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (cuDNN allows TF32 unless told not to)
        x = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
        loss = du.diffusion_loss(trainer.model, trainer.schedule, x, "v", 5.0, torch.Generator("cuda").manual_seed(0))
        loss.backward()
        grads.append({name: p.grad.float().cpu() for name, p in trainer.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_cuda_checkpoint_loads_on_the_cpu_and_resumes_on_cuda(tmp_path):
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cuda")
    trainer.train(steps=3, progress=False)
    path = du.save_checkpoint(tmp_path / "cuda.pt", trainer)
    model, _ = du.load_model(path, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert same_state({k: v.cpu() for k, v in trainer.sampling_model.state_dict().items()}, model.state_dict())
    resumed = du.load_trainer(path, device="cuda")
    assert resumed.step == 3 and resumed.optimizer.param_groups[0]["fused"] is True
    resumed.train(steps=2, progress=False)
    trainer.train(steps=2, progress=False)
    for (
        key,
        value,
    ) in trainer.model.state_dict().items():  # resume = one go, on CUDA too (up to atomics in cuDNN's backward)
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_an_fp16_run_resumes_in_fp16_with_its_gradient_scale(tmp_path):
    """The T4's path: the GradScaler's scale is part of the training state."""
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cuda", precision="fp16")
    trainer.train(steps=2, progress=False)
    trainer.scaler.update(new_scale=1024.0)  # not the initial 65536, so a lost state would show
    path = du.save_checkpoint(tmp_path / "fp16.pt", trainer)
    resumed = du.load_trainer(path, device="cuda", precision="fp16")
    assert resumed.precision == "fp16" and resumed.scaler.get_scale() == 1024.0
    assert du.load_trainer(path, device="cuda").precision == du.choose_precision(
        "cuda"
    )  # unless asked, this card's own


def test_an_unfused_cpu_checkpoint_resumes_on_cuda_with_the_fused_optimiser(tmp_path):
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=2, progress=False)
    for group in trainer.optimizer.param_groups:  # as saved on MPS, or on the CPU before 2026-11-27
        group["fused"] = None
    resumed = du.load_trainer(du.save_checkpoint(tmp_path / "cpu.pt", trainer), device="cuda")
    assert resumed.optimizer.param_groups[0]["fused"] is True
    resumed.train(steps=2, progress=False)
    assert resumed.step == 4


def test_cuda_sampling_is_seeded_and_independent_of_the_batch_size():
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cuda")
    trainer.train(steps=2, progress=False)
    model = trainer.sampling_model
    a = du.sample(model, trainer.schedule, 6, steps=5, seed=3, progress=False).images
    b = du.sample(model, trainer.schedule, 6, steps=5, seed=3, batch_size=4, progress=False).images
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2)  # different batch sizes may pick different kernels
    assert torch.equal(a, du.sample(model, trainer.schedule, 6, steps=5, seed=3, progress=False).images)


def test_data_workers_feed_cuda_the_same_batches():
    config = tiny_train_config(batch_size=8, data_workers=2)
    with_workers = du.Trainer(tiny_model_config(), config, device="cuda")
    in_process = du.Trainer(tiny_model_config(), tiny_train_config(batch_size=8), device="cuda")
    for a, b in zip(with_workers.batches(), in_process.batches()):
        assert a.is_pinned() and torch.equal(a, b)
        break


def test_sampling_in_fp16_stays_close_to_fp32():
    """The T4's sampling path, tried on any card."""
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config())
    with torch.no_grad():  # the blocks' last convs start at zero: perturb them, so x and t matter
        for module in model.modules():
            if isinstance(module, du.ResidualBlock):
                module.conv2.weight.normal_(0, 0.05)
    model = model.cuda()
    schedule = du.NoiseSchedule.from_config(model.config)
    full = du.sample(model, schedule, 4, steps=5, seed=1, precision="fp32", progress=False).images
    half = du.sample(model, schedule, 4, steps=5, seed=1, precision="fp16", progress=False).images
    assert torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.05
