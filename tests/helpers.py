"""Small builders shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import diffusion_utils as du

# The smallest network the suite trains: two levels of 8 and 16 channels on a 32x32 grid, no attention, no
# requests (pinned here, so the tests do not change when the recipe's defaults do; tests of requests ask for them).
TINY = {
    "base_channels": 8,
    "channel_mults": (1, 2),
    "pixel_unshuffle": 2,
    "bottleneck_attention": False,
    "conditional": False,
}


def tiny_model_config(**overrides) -> du.ModelConfig:
    return du.ModelConfig(**{**TINY, **overrides})


def tiny_train_config(**overrides) -> du.TrainConfig:
    """A constant learning rate of 1e-3 (pinned: a resumed run then continues exactly the one-go schedule)."""
    base = du.TrainConfig(
        batch_size=4, lr=1e-3, lr_schedule="constant", warmup_steps=2, log_every=1, channels_last=False
    )
    return dataclasses.replace(base, **overrides)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when two state dicts hold the same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Oracle(nn.Module):
    """A perfect 'network' for known clean images x0: returns the exact eps (or v) for any x_t.

    It receives the model timestep (the training timestep index) and reads alpha_bar from the
    training schedule, exactly as a trained U-Net would have to. It records every t it is given.
    """

    def __init__(self, schedule: du.NoiseSchedule, x0: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # lets sample() find the device
        self.alpha_bars = schedule.alpha_bars  # float64, indexed by training timestep
        self.x0 = x0.double()
        self.prediction = prediction
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        ab = self.alpha_bars[t].view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = (x_t.double() - a * self.x0) / s
        out = eps if self.prediction == "eps" else a * eps - s * self.x0
        return out.float()


def constant_denoiser(x0_hat: torch.Tensor):
    """A denoiser that always answers x0_hat, recording each (i) it is asked at: a sampler step's input, by hand."""

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        denoise.calls.append(i)
        return x0_hat

    denoise.calls = []
    return denoise


def state(noise: torch.Tensor | None = None, eta: float = 0.0, evaluations: int = 0) -> du.SamplerState:
    """A SamplerState whose noise is the given tensor at every draw (a draw with none given fails the test)."""

    def draw() -> torch.Tensor:
        assert noise is not None, "the step drew noise where none was expected"
        return noise

    return du.SamplerState(noise=draw, eta=eta, evaluations=evaluations)


class FlowOracle(nn.Module):
    """A perfect rectified-flow 'network' for known clean images x0: the exact velocity eps - x_0 of any x_t on the
    path x_t = (1 - t) x_0 + t eps, read from the time (T - 1) t it is given, as a trained U-Net would have to."""

    def __init__(self, x0: torch.Tensor, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.x0, self.num_timesteps = x0.double(), num_timesteps
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        self.seen.append(time.clone())
        t = (time.double() / (self.num_timesteps - 1)).view(-1, 1, 1, 1)
        eps = (x_t.double() - (1 - t) * self.x0) / t
        return (eps - self.x0).float()


def perturbed(model: du.UNet, seed: int = 1) -> du.UNet:
    """The model with every zero-initialised layer given small random weights, so that x, t and the request (or
    prompt) all change its output (an untrained U-Net ignores its blocks' second convs and its condition)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if bool((parameter == 0).all()):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr); argparse errors exit via SystemExit."""
    try:
        status = du.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    """Exit status 2 and one line on stderr, no traceback, naming each fragment."""
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
