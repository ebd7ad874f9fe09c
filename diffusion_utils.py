"""diffusion_utils: a small, complete DDPM that learns to draw circles and squares.

Read it top to bottom; the sections follow the notebook `diffusion_patterns.ipynb`:

1. Configuration and device      one dataclass holds every choice; device/precision picked per card
2. Dataset                       64x64 grayscale shapes drawn with OpenCV, values in [-1, 1]
3. Noise schedule                beta_t, alpha_bar_t and the closed-form forward process q(x_t | x_0)
4. U-Net                         a plain nn.Module eps/v-predictor conditioned on the timestep
5. Training                      MSE on the noise (or on v), EMA, warm-up, budget in steps or minutes
6. Sampling                      DDPM ancestral and DDIM steps over a respaced schedule
7. Evaluation                    objective shape metrics: valid share, circle share, blur, spread
8. Pictures                      matplotlib Figures for every stage
9. Checkpoints                   atomic writes, safe loads (no unpickling), clear errors
10. Command line                 train / sample / evaluate without Jupyter

The schedule (section 3), the network (section 4) and the sampling loop (section 6) are kept
apart, as in Hugging Face diffusers, so each can be read and swapped alone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 64
CIRCLE, SQUARE = 0, 1
CLASS_NAMES = ("circle", "square")
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
TIME_INJECTIONS = ("every_block", "bottleneck")
SAMPLERS = ("ddpm", "ddim")
MIN_SNR_FORMS = ("cap", "paper")
PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_FORMAT = "diffusion_patterns/1"


# ------------------------------------------------------------------------------------------
# 1. Configuration and device
# ------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Everything needed to rebuild a trained model and sample from it (saved in checkpoints)."""

    schedule: str = "cosine"  # "linear" (Ho et al. 2020) or "cosine" (Nichol & Dhariwal 2021)
    timesteps: int = 1000  # T, the number of noising steps in training
    prediction: str = "v"  # what the network predicts: "eps" (noise) or "v" (Salimans & Ho)
    base_channels: int = 24  # width of the first U-Net level (CPU: narrow and fast beats wide at equal time)
    channel_mults: tuple[int, ...] = (1, 2)  # width multiplier per level; each level halves size
    blocks_per_level: int = 1  # residual blocks per level
    pixel_unshuffle: int = 4  # 1 = full 64x64 input; 2 = 32x32x4 stem; 4 = 16x16x16 (16x cheaper)
    time_injection: str = "every_block"  # "bottleneck" = the original design
    bottleneck_attention: bool = True  # self-attention between the two bottleneck blocks (global context)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("time_injection", self.time_injection, TIME_INJECTIONS)
        _check_positive_int("timesteps", self.timesteps)
        _check_positive_int("base_channels", self.base_channels)
        if self.base_channels % 4:
            raise ValueError(f"base_channels must be a multiple of 4 (time embedding halves, attention heads), got {self.base_channels}")
        _check_positive_int("blocks_per_level", self.blocks_per_level)
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.pixel_unshuffle not in (1, 2, 4):
            raise ValueError(f"pixel_unshuffle must be 1, 2 or 4, got {self.pixel_unshuffle}")
        lowest = IMAGE_SIZE // self.pixel_unshuffle // 2 ** (len(self.channel_mults) - 1)
        if lowest < 2:
            raise ValueError(
                f"channel_mults {self.channel_mults}: {len(self.channel_mults)} levels after pixel_unshuffle {self.pixel_unshuffle} shrink the image below 2x2"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """How to train: optimiser, loss weighting, EMA and budget (saved in checkpoints)."""

    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_snr_gamma: float | None = 5.0  # None = plain MSE (the original design)
    min_snr_form: str = "cap"  # "cap" or "paper": how gamma enters, see NoiseSchedule.loss_weight
    ema_decay: float | None = 0.998  # None = no EMA (the original design)
    seed: int = 0
    log_every: int = 10  # read the loss back from the device every N steps (no sync in between)
    channels_last: bool = False  # CPU: 1.12x for a 2x2 stem, 1.03x for the 24-channel recipe; H100: 1.05x bf16, 1.00x fp32
    data_workers: int = 0  # background processes drawing shapes (GPU runs: the GPU outpaces one core)
    compile: bool = False  # torch.compile the training forward pass: pays off only on long GPU runs

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("log_every", self.log_every)
        if isinstance(self.data_workers, bool) or not isinstance(self.data_workers, int) or self.data_workers < 0:
            raise ValueError(f"data_workers must be an integer >= 0, got {self.data_workers!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_choice("min_snr_form", self.min_snr_form, MIN_SNR_FORMS)
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def pick_device(preferred: str | None = None) -> torch.device:
    """The given device, else the fastest available one: CUDA, then Apple MPS, then CPU."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} was asked for but CUDA is not available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {preferred!r} was asked for but there are only {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {preferred!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_ampere_or_newer(device: torch.device | str, capability: tuple[int, int] | None = None) -> bool:
    """True for a CUDA card of compute capability 8.0+ (A100, L4, H100): it has TF32 tensor cores
    and native bf16. False for older cards (T4: 7.5), CPU and MPS. Pass `capability` to test
    the rule without a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


def choose_precision(device: torch.device | str, capability: tuple[int, int] | None = None) -> str:
    """The training (and sampling) precision for this device: "fp32" or "fp16" ("bf16" on request).

    Ampere and newer cards run fp32 maths on TF32 tensor cores. For this small U-Net that beats
    bf16 autocast: 1.19x on an H100 and 1.18x on an H200 (eager; benchmarks/gpu.py), since the
    casts around every fp32 GroupNorm cost more than bf16 saves in the convolutions (measured on
    those two cards only, not on A100 or L4). Older cards such as the T4 have no TF32 and an fp32
    rate ~8x below their fp16 tensor cores, so they get fp16 with a gradient scaler. CPU and MPS
    stay in fp32. Trainer(precision="bf16") trains in bf16 on Ampere or newer.
    """
    if torch.device(device).type != "cuda":
        return "fp32"
    return "fp32" if is_ampere_or_newer(device, capability) else "fp16"


def check_precision(device: torch.device | str, precision: str | None, capability: tuple[int, int] | None = None) -> str:
    """`precision` if this device can run it (None: choose_precision's pick), else a ValueError
    that says what it can run: CPU and MPS run fp32 only, and bf16 needs an Ampere or newer card
    (an older one such as the T4 would emulate it, slowly). Pass `capability` to test the rule
    without a GPU."""
    if precision is None:
        return choose_precision(device, capability)
    _check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device; {device} runs in fp32")
    if precision == "bf16" and not is_ampere_or_newer(device, capability):
        found = capability or torch.cuda.get_device_capability(device)
        raise ValueError(f"precision 'bf16' needs a GPU of compute capability 8.0+ (Ampere or newer); this one is {found[0]}.{found[1]}: use 'fp16' or 'fp32'")
    return precision


def use_tf32_on_cuda(device: torch.device) -> None:
    """Let fp32 matmuls and convs use TF32 tensor cores (Ampere and newer; a no-op elsewhere).
    A process-wide switch: "fp32" on these cards means fp32 storage with TF32 maths."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fused_adamw(device: torch.device) -> bool | None:
    """Whether AdamW should use its fused kernel here: one pass over each tensor instead of ~10
    elementwise ops (CPU: 1.1 against 7.3 ms per optimiser step for the 24-channel recipe).
    None on MPS, which keeps PyTorch's default (fused is unmeasured there)."""
    return True if device.type in ("cuda", "cpu") else None


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_configs(device: torch.device | str) -> tuple[ModelConfig, TrainConfig]:
    """The project's best recipe for this kind of device (measured in benchmarks/)."""
    device = torch.device(device)
    if device.type == "cuda":
        model = ModelConfig(base_channels=64, channel_mults=(1, 2, 2), blocks_per_level=2, pixel_unshuffle=2)
        return model, TrainConfig(batch_size=256, lr=1e-3, warmup_steps=200, ema_decay=0.999, data_workers=min(4, max(1, (os.cpu_count() or 2) - 1)))
    # CPU (and MPS, unmeasured): narrow, since a CPU is compute-bound and 24 channels see 3.6x the
    # images of 64 in the same minutes (README, "Width")
    model = ModelConfig(base_channels=24)
    return model, TrainConfig(channels_last=device.type == "cpu")


def default_training_minutes(device: torch.device | str, capability: tuple[int, int] | None = None) -> float:
    """The notebook's training budget when none is given: long enough for clean shapes, short
    enough for a learner. Ampere and newer: 3 minutes (an H100 reaches 99.4 % valid in 60 s and
    after 3 minutes, measured once; A100 and L4 are unmeasured). Older GPUs
    such as Colab's T4: 7 minutes (an estimate, not measured: about a tenth of an H100's
    bandwidth and fp16 rate, so ~700+ steps of batch 256, where the H100 runs were at 96-98 %).
    CPU and MPS: 15 minutes (2-core CPU: 96-99 % valid, 2.0-2.7 % mid-gray pixels, measured)."""
    if torch.device(device).type != "cuda":
        return 15
    return 3 if is_ampere_or_newer(device, capability) else 7


def original_design_configs(like: tuple[ModelConfig, TrainConfig] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The design this project started from, with the network size and batch of `like` (default:
    the CPU recipe): linear schedule, eps target, time added only at the bottleneck, no attention,
    plain MSE, no EMA (sample it with 1000 DDPM steps)."""
    model, train = like or default_configs("cpu")
    model = dataclasses.replace(model, schedule="linear", prediction="eps", time_injection="bottleneck", bottleneck_attention=False)
    return model, dataclasses.replace(train, min_snr_gamma=None, ema_decay=None)


# ------------------------------------------------------------------------------------------
# 2. Dataset: one filled white circle or square on black, drawn with OpenCV
# ------------------------------------------------------------------------------------------

SIZE_RANGE = (15, 39)  # diameter of circles / side of squares, in pixels, both ends included
MARGIN = 4  # every shape stays at least this many pixels away from the border


@dataclass
class ShapeBatch:
    """Images in [-1, 1] of shape (N, 1, 64, 64) and what was drawn in each."""

    images: torch.Tensor
    labels: np.ndarray  # 0 = circle, 1 = square
    centers: np.ndarray  # (N, 2) centre (x, y) in pixels
    sizes: np.ndarray  # diameter or side, in pixels

    def __len__(self) -> int:
        return len(self.labels)


def draw_shape(label: int, center: tuple[int, int], size: int) -> np.ndarray:
    """One 64x64 uint8 image: a filled, hard-edged (no anti-aliasing) white shape on black."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    cx, cy = center
    if label == CIRCLE:  # size = 2r + 1 pixels across
        cv2.circle(image, (cx, cy), (size - 1) // 2, 255, thickness=-1, lineType=cv2.LINE_8)
    else:  # size = side; the centre is the middle pixel (or the corner of the middle four)
        x0, y0 = cx - (size - 1) // 2, cy - (size - 1) // 2
        cv2.rectangle(image, (x0, y0), (x0 + size - 1, y0 + size - 1), 255, thickness=-1)
    return image


def make_shapes(n: int, seed: int | Sequence[int] = 0) -> ShapeBatch:
    """Draw n random shapes, 50/50 circles and squares, reproducibly from a seed.

    Size is uniform over SIZE_RANGE (circles: odd diameters 2r + 1), and the centre is uniform
    over the pixel positions that keep the whole shape MARGIN pixels inside the frame.
    """
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    radii = rng.integers((SIZE_RANGE[0] - 1) // 2, (SIZE_RANGE[1] - 1) // 2 + 1, size=n)
    sides = rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=n)
    sizes = np.where(labels == CIRCLE, 2 * radii + 1, sides)
    low = MARGIN + (sizes - 1) // 2  # first pixel of the shape must be >= MARGIN
    high = IMAGE_SIZE - 1 - MARGIN - sizes // 2  # last pixel must be <= 63 - MARGIN
    pixel_centers = rng.integers(low[:, None], high[:, None] + 1, size=(n, 2))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i in range(n):
        images[i] = draw_shape(int(labels[i]), (int(pixel_centers[i, 0]), int(pixel_centers[i, 1])), int(sizes[i]))
    offsets = np.where((labels == SQUARE) & (sizes % 2 == 0), 0.5, 0.0)  # even squares: centre between pixels
    centers = pixel_centers + offsets[:, None]
    return ShapeBatch(uint8_to_model(images), labels, centers, sizes.astype(np.float64))


class ShapeStream(torch.utils.data.IterableDataset):
    """Fresh procedural batches, a new set of shapes every step, so the model cannot memorise.

    Batch k is always make_shapes(batch_size, seed=(seed, k)): the stream is reproducible and
    resumes exactly from any step. With DataLoader workers, worker w draws steps w, w + W, ...
    and the loader interleaves them back in order, so the GPU never waits for OpenCV.
    """

    def __init__(self, batch_size: int, seed: int = 0, start_step: int = 0) -> None:
        _check_positive_int("batch_size", batch_size)
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = torch.utils.data.get_worker_info()
        step, stride = (self.start_step, 1) if worker is None else (self.start_step + worker.id, worker.num_workers)
        while True:
            yield make_shapes(self.batch_size, seed=(self.seed, step)).images
            step += stride


def training_batches(batch_size: int, seed: int = 0, start_step: int = 0, workers: int = 0, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Iterate over a ShapeStream, in `workers` background processes when workers > 0."""
    stream = ShapeStream(batch_size, seed, start_step)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4, persistent_workers=False)
    return iter(loader)


def fixed_batches(images: torch.Tensor, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Random mini-batches from a fixed set (the classic epoch-based dataset), resumable by step."""
    validate_images(images)
    step = start_step
    while True:
        index = torch.from_numpy(np.random.default_rng((seed, step)).integers(0, len(images), batch_size))
        yield images[index]
        step += 1


def uint8_to_model(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64) uint8 in [0, 255] -> (N, 1, 64, 64) float32 in [-1, 1]."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)


def model_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 64, 64) float in [-1, 1] -> (N, 64, 64) uint8 in [0, 255] (values outside clip)."""
    validate_images(images, check_range=False)
    scaled = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).squeeze(1).numpy()


def validate_images(images: object, check_range: bool = True) -> None:
    """Raise a clear TypeError/ValueError unless images is a float (N, 1, 64, 64) tensor in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE) or len(images) == 0:
        raise ValueError(f"images must have shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) with N >= 1, got {tuple(images.shape)}")
    if check_range:
        low, high = images.min().item(), images.max().item()
        if not (math.isfinite(low) and math.isfinite(high)) or low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
            raise ValueError(f"images must lie in [-1, 1], got values in [{low:.7g}, {high:.7g}]")  # 7 digits: 1.0002 is not "1"


# ------------------------------------------------------------------------------------------
# 3. Noise schedule and forward process
# ------------------------------------------------------------------------------------------


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): beta_t rises linearly from 1e-4 to 0.02 (scaled for T != 1000)."""
    scale = 1000 / timesteps
    if beta_end * scale >= 1:
        raise ValueError(f"the linear schedule needs at least {math.floor(beta_end * 1000) + 1} timesteps, got {timesteps}")
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at 0.999 to avoid a singularity at t = T.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """The fixed forward process and everything derived from it, precomputed in float64.

    Timesteps are indexed t = 0 .. T-1; x_0 is the clean image and x_t has had t+1 noise steps.
    `timesteps` maps each index to the timestep the network sees (the identity, unless the
    schedule was respaced for faster sampling, see `respaced`).
    """

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.timesteps = torch.arange(len(betas)) if timesteps is None else timesteps.long()
        self.alphas = 1 - betas  # alpha_t = 1 - beta_t
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # alpha_bar_t = prod_{s<=t} alpha_s
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.sqrt_alpha_bars = self.alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1 - self.alpha_bars).sqrt()
        self.snr = self.alpha_bars / (1 - self.alpha_bars)  # signal-to-noise ratio alpha_bar / (1 - alpha_bar)
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde_t)
        self.posterior_variance = betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)
        self.posterior_mean_coef1 = betas * self.alpha_bars_prev.sqrt() / (1 - self.alpha_bars)
        self.posterior_mean_coef2 = (1 - self.alpha_bars_prev) * self.alphas.sqrt() / (1 - self.alpha_bars)
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: ModelConfig) -> NoiseSchedule:
        return cls.create(config.schedule, config.timesteps)

    @classmethod
    def create(cls, kind: str = "cosine", timesteps: int = 1000) -> NoiseSchedule:
        _check_choice("schedule", kind, SCHEDULES)
        _check_positive_int("timesteps", timesteps)
        return cls(linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps))

    def __len__(self) -> int:
        return len(self.betas)

    def respaced(self, num_steps: int) -> NoiseSchedule:
        """A shorter schedule over num_steps of the original timesteps, evenly spaced from T-1 to 0.

        It keeps alpha_bar at the kept steps, so beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}
        (Nichol & Dhariwal 2021, section 4): a model trained on T steps samples in fewer.
        """
        _check_positive_int("num_steps", num_steps)
        if num_steps > len(self):
            raise ValueError(f"num_steps must be <= the {len(self)} training timesteps, got {num_steps}")
        if num_steps == 1:  # a single step must start where sampling does: pure noise at T-1
            kept = torch.tensor([len(self) - 1])
        else:
            kept = torch.linspace(0, len(self) - 1, num_steps, dtype=torch.float64).round().long()
        kept_alpha_bars = self.alpha_bars[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_alpha_bars[:-1]])
        return NoiseSchedule(1 - kept_alpha_bars / previous, timesteps=self.timesteps[kept])

    def check_t(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an integer tensor of timestep indices, got {t!r}")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= len(self)):
            raise ValueError(f"timesteps must be in [0, {len(self) - 1}], got values in [{int(t.min())}, {int(t.max())}]")

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as a (N, 1, 1, 1) tensor on like's device and dtype, ready to broadcast.

        Each table is copied to the device once (as float32, which MPS needs) and cached, so
        the training loop does no host-to-device copy per step.
        """
        key = (id(values), like.device)
        if key not in self._device_tables:
            self._device_tables[key] = values.to(like.device, torch.float32)
        return self._device_tables[key][t].to(like.dtype).view(-1, 1, 1, 1)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1} for each image of a batch."""
        return torch.randint(0, len(self), (n,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        self.check_t(t)
        if x0.shape != noise.shape or len(t) != len(x0):
            raise ValueError(f"x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and t ({len(t)}) must match")
        return self._add_noise(x0, noise, t)

    def _add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """add_noise without the checks, which would cost a host-device sync in the training loop."""
        return self.gather(self.sqrt_alpha_bars, t, x0) * x0 + self.gather(self.sqrt_one_minus_alpha_bars, t, x0) * noise

    # Prediction targets and the exact conversions between x_0, eps and v.
    # With a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) and a^2 + s^2 = 1:
    #   x_t = a x_0 + s eps,   v = a eps - s x_0,   so   x_0 = a x_t - s v,   eps = s x_t + a v.

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
        return self.gather(self.sqrt_alpha_bars, t, x0) * noise - self.gather(self.sqrt_one_minus_alpha_bars, t, x0) * x0

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps itself, or v."""
        _check_choice("prediction", prediction, PREDICTIONS)
        return noise if prediction == "eps" else self.velocity(x0, noise, t)

    def predict_x0(self, prediction: str, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 from a network output: (x_t - s eps) / a for eps, a x_t - s v for v."""
        a = self.gather(self.sqrt_alpha_bars, t, x_t)
        s = self.gather(self.sqrt_one_minus_alpha_bars, t, x_t)
        return (x_t - s * output) / a if prediction == "eps" else a * x_t - s * output

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - a x_0) / s: the noise consistent with x_t and a (clipped) x_0."""
        a = self.gather(self.sqrt_alpha_bars, t, x_t)
        s = self.gather(self.sqrt_one_minus_alpha_bars, t, x_t)
        return (x_t - a * x0) / s

    def loss_weight(self, prediction: str, t: torch.Tensor, min_snr_gamma: float | None, min_snr_form: str = "cap") -> torch.Tensor:
        """Min-SNR-gamma weights per timestep (Hang et al. 2023), 1 when gamma is None.

        Each target's error is an x_0 error in disguise (predict_x0 inverts it):
            ||eps_hat - eps||^2 = SNR ||x0_hat - x_0||^2,   ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x_0||^2,
        so plain MSE already weights the x_0 error by lam = SNR (eps) or SNR + 1 (v).
        "cap": w = min(lam, gamma) / lam, an x_0 weight of min(lam, gamma): plain MSE with its weight
            capped at gamma, so the low-noise steps (lam huge) stop dominating and the rest keep their loss.
        "paper": w = min(SNR, gamma) / lam, an x_0 weight of min(SNR, gamma) (Hang et al.'s formula).
            For v this sends the noisiest steps, where the shape is chosen, to weight 0 (SNR -> 0).
        For eps the two are the same. For v, "cap" won by 10 points of valid shapes (README).
        """
        _check_choice("min_snr_form", min_snr_form, MIN_SNR_FORMS)
        ones = torch.ones(len(t), device=t.device)
        if min_snr_gamma is None:
            return ones
        snr = self.gather(self.snr, t, ones).flatten()
        lam = snr if prediction == "eps" else snr + 1  # the x_0 weight plain MSE on this target gives
        clipped = (lam if min_snr_form == "cap" else snr).clamp(max=min_snr_gamma)
        return clipped / lam

    # The reverse process: one step from x_t to x_{t-1}, given the network's prediction.

    def ddpm_step(self, x_t: torch.Tensor, x0: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
        """Ancestral sampling (Ho et al. 2020): x_{t-1} = coef1 x_0 + coef2 x_t + sqrt(beta_tilde_t) z."""
        mean = float(self.posterior_mean_coef1[i]) * x0 + float(self.posterior_mean_coef2[i]) * x_t
        if i == 0 or noise is None:
            return mean
        return mean + math.sqrt(float(self.posterior_variance[i])) * noise

    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, i: int, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
        """DDIM (Song et al. 2021): x_{t-1} = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.

        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev); eta = 0 is
        deterministic and eta = 1 is exactly the ancestral DDPM step.
        """
        ab, ab_prev = float(self.alpha_bars[i]), float(self.alpha_bars_prev[i])
        eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        direction = math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        x_prev = math.sqrt(ab_prev) * x0 + direction
        if sigma > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev


# ------------------------------------------------------------------------------------------
# 4. The time-conditioned U-Net
# ------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style timestep features: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time), GroupNorm -> SiLU -> conv, plus a skip connection.

    If time_dim is set, a linear projection of the time embedding is added to every channel
    after the first conv: the block's features then depend on how noisy the input is.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(time)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual connection.

    softmax(Q K^T / sqrt(d)) V lets every position see every other one in a single layer: cheap at
    the 8x8 bottleneck, and it helps the network agree on one shape for the whole image.
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)  # starts as the identity, like the residual blocks
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # (n, heads, h*w, c/heads)
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """Encoder-decoder with skip connections that predicts eps (or v) from (x_t, t).

    Encoder: each level runs residual blocks, keeps its output for the decoder (the skip), then
    halves the resolution with a strided conv. Bottleneck: two residual blocks. Decoder: mirror
    image, concatenating each level's skip before its blocks and doubling the resolution with
    nearest-neighbour upsampling + conv. The timestep goes through a sinusoidal embedding and a
    small MLP, then is added either in every residual block or only at the bottleneck (the
    original design). An optional pixel-unshuffle stem folds 2x2 (or 4x4) pixels into channels,
    so the network runs at 32x32 (16x16), 4x (16x) cheaper, and a pixel-shuffle undoes it.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        widths = [config.base_channels * m for m in config.channel_mults]
        time_dim = config.base_channels * 4
        block_time = time_dim if config.time_injection == "every_block" else None
        factor = config.pixel_unshuffle
        self.time_mlp = nn.Sequential(nn.Linear(config.base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Sequential(nn.PixelUnshuffle(factor), nn.Conv2d(factor * factor, widths[0], 3, padding=1))

        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        channels = widths[0]
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.blocks_per_level):
                blocks.append(ResidualBlock(channels, width, block_time, config.dropout))
                channels = width
            self.down_blocks.append(nn.ModuleList(blocks))
            last = level == len(widths) - 1
            self.downsamplers.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.mid_blocks = nn.ModuleList([ResidualBlock(channels, channels, time_dim, config.dropout) for _ in range(2)])
        self.mid_attention = SelfAttention(channels) if config.bottleneck_attention else nn.Identity()

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = []
            for b in range(config.blocks_per_level):
                skip = width if b == 0 else 0  # the level's skip joins before its first block
                blocks.append(ResidualBlock(channels + skip, width, block_time, config.dropout))
                channels = width
            self.up_blocks.append(nn.ModuleList(blocks))
            self.upsamplers.append(
                nn.Identity() if level == 0 else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, widths[level - 1], 3, padding=1))
            )
            channels = width if level == 0 else widths[level - 1]

        self.head = nn.Sequential(_group_norm(channels), nn.SiLU(), nn.Conv2d(channels, factor * factor, 3, padding=1), nn.PixelShuffle(factor))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))
        h = self.stem(x)
        skips = []
        for blocks, downsample in zip(self.down_blocks, self.downsamplers):
            for block in blocks:
                h = block(h, time)
            skips.append(h)
            h = downsample(h)
        h = self.mid_blocks[0](h, time)
        h = self.mid_attention(h)
        h = self.mid_blocks[1](h, time)
        for blocks, upsample in zip(self.up_blocks, self.upsamplers):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, time)
            h = upsample(h)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: UNet) -> str:
    """Parameter count and the feature-map shape at each level, for a one-line summary."""
    c = model.config
    size = IMAGE_SIZE // c.pixel_unshuffle
    levels = [f"{c.base_channels * m}x{size >> i}x{size >> i}" for i, m in enumerate(c.channel_mults)]
    return f"U-Net, {count_parameters(model) / 1e6:.2f} M parameters; levels (channels x H x W): {' -> '.join(levels)}; time enters {c.time_injection.replace('_', ' ')}"


@torch.no_grad()
def feature_shapes(model: UNet) -> list[tuple[str, tuple[int, ...]]]:
    """(stage, (channels, H, W)) of the feature maps in one forward pass of a 64x64 image.

    Forward hooks record the stem output, each encoder level (its skip), the bottleneck, each
    decoder level (before upsampling) and the head; the model's weights and mode are untouched.
    """
    shapes: list[tuple[str, tuple[int, ...]]] = [("input", (1, IMAGE_SIZE, IMAGE_SIZE))]
    levels = len(model.config.channel_mults)
    watched = [("stem (pixel-unshuffle + conv)", model.stem)]
    watched += [(f"encoder level {k}", blocks[-1]) for k, blocks in enumerate(model.down_blocks)]
    watched += [("bottleneck", model.mid_blocks[-1])]
    watched += [(f"decoder level {levels - 1 - k}", blocks[-1]) for k, blocks in enumerate(model.up_blocks)]
    watched += [("head (conv + pixel-shuffle)", model.head)]

    def recorder(name: str) -> Callable:
        return lambda module, inputs, output: shapes.append((name, tuple(output.shape[1:])))

    handles = [module.register_forward_hook(recorder(name)) for name, module in watched]
    was_training = model.training
    try:
        parameter = next(model.parameters())
        model.eval()(
            torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device=parameter.device, dtype=parameter.dtype), torch.zeros(1, dtype=torch.long, device=parameter.device)
        )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes


# ------------------------------------------------------------------------------------------
# 5. Training: MSE between the network output and the target (eps or v)
# ------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last saved checkpoint is untouched."""


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    prediction: str,
    min_snr_gamma: float | None,
    generator: torch.Generator | None = None,
    *,
    min_snr_form: str = "cap",
) -> torch.Tensor:
    """One Monte-Carlo estimate of the training objective.

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,
    loss = mean_i w(t_i) || model(x_t, t) - target ||^2   (target = eps or v;
    w = NoiseSchedule.loss_weight with min_snr_gamma and min_snr_form).
    """
    t = schedule.sample_timesteps(len(x0), generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule._add_noise(x0, noise, t)
    target = schedule.target(prediction, x0, noise, t)
    output = model(x_t, t)
    per_image = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = schedule.loss_weight(prediction, t, min_snr_gamma, min_snr_form).to(per_image)
    return (weights * per_image).mean()


class EMA:
    """Exponential moving average of the weights, with warm-up: decay_k = min(decay, (1+k)/(10+k)).

    The warm-up lets a short run forget the random initial weights quickly; sample from the EMA.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # ema = decay * ema + (1 - decay) * param, for every tensor in one fused call (a loop of
        # ema_param.lerp_(param, 1 - decay) does the same with one GPU kernel launch per tensor)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        self.updates += 1


class Trainer:
    """Owns the model, its EMA, the optimiser and the RNG; `train` runs for a step or time budget."""

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        device: torch.device | str | None = None,
        data: torch.Tensor | None = None,
        precision: str | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.precision = check_precision(self.device, precision)  # e.g. "fp16" to try a T4's path on a newer card
        default_model, default_train = default_configs(self.device)
        self.model_config = model_config or default_model
        self.train_config = cfg = train_config or default_train
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; global RNG untouched
            torch.manual_seed(cfg.seed)
            self.model = UNet(self.model_config).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule.from_config(self.model_config)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        use_tf32_on_cuda(self.device)
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw(self.device))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: min(1.0, (k + 1) / (cfg.warmup_steps + 1)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.data = data
        self.step = 0
        self.images_seen = 0
        self.losses: list[float] = []
        self._batch_iterator: Iterator[torch.Tensor] | None = None  # kept between train() calls
        self._batch_iterator_step = -1  # the step whose batch the iterator yields next

    @property
    def sampling_model(self) -> nn.Module:
        """The EMA weights when there are any (they give cleaner samples), else the raw model."""
        return self.ema.model if self.ema is not None else self.model

    def batches(self) -> Iterator[torch.Tensor]:
        """Training batches from the current step on (the same ones whenever they are asked for)."""
        cfg = self.train_config
        if self.data is None:
            return training_batches(cfg.batch_size, cfg.seed, self.step, cfg.data_workers, pin_memory=self.device.type == "cuda")
        return fixed_batches(self.data, cfg.batch_size, cfg.seed, self.step)

    def _batches_from_here(self) -> Iterator[torch.Tensor]:
        """The iterator of the last train() call when it is still at this step, else a new one:
        training in chunks then starts DataLoader workers once, not once per chunk."""
        if self._batch_iterator is None or self._batch_iterator_step != self.step:
            self._batch_iterator = self.batches()
        return self._batch_iterator

    def train_step(self, x0: torch.Tensor) -> torch.Tensor:
        """One optimiser step; returns the loss as a tensor (no host-device sync here)."""
        cfg = self.train_config
        x0 = x0.to(self.device, non_blocking=True)
        if cfg.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        self.model.train()
        with autocast_for(self.device, self.precision):
            loss = diffusion_loss(
                self.train_model, self.schedule, x0, self.model_config.prediction, cfg.min_snr_gamma, self.generator, min_snr_form=cfg.min_snr_form
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.images_seen += len(x0)
        return loss.detach()

    def train(
        self,
        steps: int | None = None,
        minutes: float | None = None,
        progress: bool = True,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 500,
        on_log: Callable[[Trainer], None] | None = None,
    ) -> list[float]:
        """Train for `steps` more steps or `minutes` of wall time (whichever is given; both: first hit).

        The loss is read back every `log_every` steps; a NaN/inf loss stops training with
        NonFiniteLossError naming the step, before anything is saved. With checkpoint_path,
        a checkpoint is written atomically every `checkpoint_every` steps and at the end.
        Returns the loss history (one value per step, all steps so far).
        """
        from tqdm.auto import tqdm

        if steps is None and minutes is None:
            raise ValueError("give a training budget: steps or minutes")
        if steps is not None:
            _check_positive_int("steps", steps)
        if minutes is not None and not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        _check_positive_int("checkpoint_every", checkpoint_every)
        started = time.monotonic()
        deadline = started + minutes * 60 if minutes is not None else math.inf
        last_step = self.step + steps if steps is not None else math.inf
        by_steps = steps is not None  # the bar counts steps, or seconds of the time budget
        bar = tqdm(
            total=steps if by_steps else round(minutes * 60), unit="step" if by_steps else "s", desc="training", disable=not progress, dynamic_ncols=True
        )
        pending: list[torch.Tensor] = []
        saved_at = None
        batches = self._batches_from_here()
        try:
            while self.step < last_step and time.monotonic() < deadline:
                self._batch_iterator_step = -1  # out of step until this batch is trained on
                pending.append(self.train_step(next(batches)))
                self._batch_iterator_step = self.step
                finished = self.step >= last_step or time.monotonic() >= deadline
                save_now = checkpoint_path is not None and self.step % checkpoint_every == 0
                if len(pending) >= self.train_config.log_every or finished or save_now:
                    self._record_losses(pending)  # raises on NaN/inf before anything is saved
                    bar.update(len(pending) if by_steps else round(time.monotonic() - started) - bar.n)
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}", images=self.images_seen)
                    pending = []
                    if on_log is not None:
                        on_log(self)
                if save_now:
                    save_checkpoint(checkpoint_path, self)
                    saved_at = self.step
        finally:
            bar.close()
        if checkpoint_path is not None and saved_at != self.step:
            save_checkpoint(checkpoint_path, self)
        return self.losses

    def _record_losses(self, pending: list[torch.Tensor]) -> None:
        values = torch.stack(pending).float().cpu().tolist()  # one sync for log_every steps
        first_step = self.step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"training stopped: the loss became {value} at step {first_step + offset}; the last saved checkpoint is unchanged (try a lower lr)"
                )
        self.losses.extend(values)

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
            "step": self.step,
            "images_seen": self.images_seen,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(self._optimizer_state_for_this_device(state["optimizer"]))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state.get("generator_device") == self.device.type:
            self.generator.set_state(state["generator"].cpu())
        else:  # CPU and CUDA generators have different states: continue with a fresh, seeded stream
            self.generator.manual_seed(self.train_config.seed * 1_000_003 + self.step)
        self.images_seen = int(state["images_seen"])
        self.losses = [float(v) for v in state["losses"]]
        self._batch_iterator = None

    def _optimizer_state_for_this_device(self, saved: dict) -> dict:
        """The saved AdamW state with this device's kernel choice (fused on CUDA and CPU, not on
        MPS): load_state_dict would otherwise carry the unfused AdamW of an MPS run (or of a CPU
        checkpoint saved before 2026-11-27) onto the CPU or GPU, or the reverse."""
        fused = self.optimizer.param_groups[0].get("fused")
        return {**saved, "param_groups": [{**group, "fused": fused} for group in saved["param_groups"]]}


# ------------------------------------------------------------------------------------------
# 6. Sampling: from pure noise x_T ~ N(0, I) back to an image, one denoising step at a time
# ------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, 1, 64, 64) in [-1, 1], on the CPU
    timesteps: list[int] = field(default_factory=list)  # training timesteps of the saved steps
    x_t: list[torch.Tensor] = field(default_factory=list)  # the noisy image at each saved step
    x0: list[torch.Tensor] = field(default_factory=list)  # the network's guess of x_0 there


@torch.no_grad()
def sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    n: int,
    steps: int = 100,
    sampler: str = "ddpm",
    eta: float | None = None,
    seed: int = 0,
    prediction: str | None = None,
    save_at: Sequence[int] = (),
    batch_size: int = 256,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: str | None = None,
) -> SampleResult:
    """Generate n images from pure noise with `steps` reverse steps (respaced from the T of training).

    Each step: the network output gives x_0_hat (clipped to [-1, 1]); then
    ddpm: x_{t-1} ~ q(x_{t-1} | x_t, x_0_hat)  (ancestral, stochastic)
    ddim: x_{t-1} = sqrt(ab_prev) x_0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z  (eta=0: deterministic)
    Images are made in chunks of batch_size so memory stays bounded for any n. save_at lists
    step indices (0 = first step from pure noise) whose x_t and x_0_hat are kept for pictures.
    The same seed gives the same images whatever batch_size is. precision: this device's
    (choose_precision) unless given, as in Trainer.
    """
    _check_positive_int("n", n)
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    _check_choice("sampler", sampler, SAMPLERS)
    prediction = prediction or getattr(getattr(model, "config", None), "prediction", None)
    if prediction is None:
        raise ValueError("prediction ('eps' or 'v') must be given for a model without a config")
    _check_choice("prediction", prediction, PREDICTIONS)
    if sampler == "ddpm" and eta not in (None, 1.0):
        raise ValueError(f"eta applies to the ddim sampler only (ddpm is ddim with eta=1), got eta={eta}")
    eta = 0.0 if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    bad = [s for s in save_at if not 0 <= s < steps]
    if bad:
        raise ValueError(f"save_at steps must be in [0, {steps - 1}], got {bad}")
    model_device = next(model.parameters()).device
    if device is not None and torch.device(device).type != model_device.type:
        raise ValueError(f"the model is on {model_device}; move it with model.to({str(device)!r}) before sampling there")
    device = model_device
    spaced = schedule.respaced(steps)
    model_timesteps = spaced.timesteps.to(device)  # the training timestep of each respaced step
    precision = check_precision(device, precision)
    use_tf32_on_cuda(device)
    was_training = model.training
    model.eval()
    result = SampleResult(images=torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    result.timesteps = [int(spaced.timesteps[steps - 1 - s]) for s in sorted(save_at)]
    chunks = [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]
    from tqdm.auto import tqdm

    bar = tqdm(total=steps * len(chunks), disable=not progress, desc=f"sampling ({sampler}, {steps} steps)", unit="step", dynamic_ncols=True)
    saved: dict[int, tuple[list, list]] = {s: ([], []) for s in sorted(save_at)}
    for start, stop in chunks:
        # one generator per image, so an image does not depend on the chunk it was made in
        generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + k) for k in range(start, stop)]
        x = next(_noise_per_image(generators, device, 1))  # x_T ~ N(0, I)
        stochastic = sampler == "ddpm" or eta > 0
        step_noise = _noise_per_image(generators, device, steps - 1 if stochastic else 0)
        for s in range(steps):
            i = steps - 1 - s  # index into the respaced schedule, from most to least noisy
            t = torch.full((stop - start,), i, device=device, dtype=torch.long)
            with autocast_for(device, precision):
                output = model(x, model_timesteps[t]).float()
            x0 = spaced.predict_x0(prediction, x, output, t).clamp(-1, 1)  # clip x_0_hat to the data range
            noise = next(step_noise) if stochastic and i > 0 else None
            if sampler == "ddpm":
                x_next = spaced.ddpm_step(x, x0, i, noise)
            else:
                x_next = spaced.ddim_step(x, x0, i, eta, noise)
            if s in saved:
                saved[s][0].append(x.cpu())
                saved[s][1].append(x0.cpu())
            x = x_next
            bar.update(1)
        result.images[start:stop] = x.clamp(-1, 1).cpu()
    bar.close()
    model.train(was_training)
    result.x_t = [torch.cat(saved[s][0]) for s in sorted(save_at)]
    result.x0 = [torch.cat(saved[s][1]) for s in sorted(save_at)]
    return result


def _noise_per_image(generators: list[torch.Generator], device: torch.device, count: int, block: int = 10) -> Iterator[torch.Tensor]:
    """`count` noise tensors (N, 1, 64, 64); image k's noise comes from generators[k] alone.

    Drawn `block` steps at a time, so a GPU gets N random-number launches per block, not per step.
    """
    for start in range(0, count, block):
        size = min(block, count - start)
        yield from torch.stack([torch.randn(size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g, device=device) for g in generators], dim=1)


# ------------------------------------------------------------------------------------------
# 7. Evaluation: does each sample show exactly one clean circle or square?
# ------------------------------------------------------------------------------------------

VALID_IOU = 0.90  # a blob is a valid shape when its IoU with the best ideal shape is >= this
MIN_BLOB_PIXELS = 5  # smaller specks are ignored when counting blobs
MID_GRAY = (32, 223)  # pixels strictly between these uint8 values count as blur


@dataclass
class ShapeReading:
    """What the evaluator sees in one image."""

    blobs: int
    label: int  # best-matching ideal shape: 0 circle, 1 square (-1 if no blob)
    iou: float
    center: tuple[float, float]
    size: float  # diameter of the equal-area circle or side of the equal-area square

    @property
    def valid(self) -> bool:
        return self.blobs == 1 and self.iou >= VALID_IOU


_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)


def ideal_shape_iou(mask: np.ndarray) -> tuple[int, float]:
    """Best IoU of a binary mask with the ideal filled circle or axis-aligned square of equal area and centroid."""
    area = float(mask.sum())
    if area == 0:
        return -1, 0.0
    cy, cx = _GRID_Y[mask].mean(), _GRID_X[mask].mean()
    radius = math.sqrt(area / math.pi)
    circle = (_GRID_X - cx) ** 2 + (_GRID_Y - cy) ** 2 <= radius**2
    half = math.sqrt(area) / 2
    square = (np.abs(_GRID_X - cx) <= half) & (np.abs(_GRID_Y - cy) <= half)
    ious = [float((mask & ideal).sum() / (mask | ideal).sum()) for ideal in (circle, square)]
    label = int(np.argmax(ious))
    return label, ious[label]


def read_shape(image: np.ndarray) -> ShapeReading:
    """Threshold a uint8 image at mid-gray, count blobs of >= 5 px, and match the largest to ideal shapes."""
    mask = image > 127
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    big = np.flatnonzero(sizes >= MIN_BLOB_PIXELS) + 1
    if len(big) == 0:
        return ShapeReading(0, -1, 0.0, (math.nan, math.nan), math.nan)
    largest = big[np.argmax(stats[big, cv2.CC_STAT_AREA])]
    blob = components == largest
    label, iou = ideal_shape_iou(blob)
    area = float(blob.sum())
    size = 2 * math.sqrt(area / math.pi) if label == CIRCLE else math.sqrt(area)
    return ShapeReading(len(big), label, iou, (float(_GRID_X[blob].mean()), float(_GRID_Y[blob].mean())), size)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two 1-D samples (mean gap between matching quantiles)."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    q = np.linspace(0, 1, 201)
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


_REFERENCE_CACHE: dict[int, list[ShapeReading]] = {}


def _reference_readings(n: int = 2048) -> list[ShapeReading]:
    if n not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[n] = [read_shape(im) for im in model_to_uint8(make_shapes(n, seed=12345).images)]
    return _REFERENCE_CACHE[n]


def evaluate_samples(samples: torch.Tensor | np.ndarray, reference: Sequence[ShapeReading] | None = None) -> dict[str, float]:
    """Objective quality of a batch of generated images.

    valid          share with exactly one blob whose IoU with an ideal circle/square >= 0.90
    circle_share   share of circles among the valid shapes (training data: 0.5)
    mid_gray       share of pixels strictly between 32 and 223 of 255 (blur and gray backgrounds)
    size_w1        distance (pixels) between the size distributions of valid samples and real data
    position_w1    same for the centre, averaged over x and y
    Accepts (N, 1, 64, 64) floats in [-1, 1] or (N, 64, 64) uint8.
    """
    images = _as_uint8_images(samples)
    readings = [read_shape(image) for image in images]
    valid = [r for r in readings if r.valid]
    reference = list(reference) if reference is not None else _reference_readings()
    ref_valid = [r for r in reference if r.valid]
    mid_gray = float(((images > MID_GRAY[0]) & (images < MID_GRAY[1])).mean())
    return {
        "n": len(images),
        "valid": len(valid) / len(images),
        "circle_share": float(np.mean([r.label == CIRCLE for r in valid])) if valid else math.nan,
        "mid_gray": mid_gray,
        "size_w1": wasserstein_1d(np.array([r.size for r in valid]), np.array([r.size for r in ref_valid])),
        "position_w1": float(np.mean([wasserstein_1d(np.array([r.center[k] for r in valid]), np.array([r.center[k] for r in ref_valid])) for k in (0, 1)])),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (for IPython.display.Markdown): floats to 3 significant digits, NaN as "-"."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"each row needs {len(headers)} cells, got {len(row)}: {row!r}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _as_uint8_images(samples: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        validate_images(samples, check_range=False)
        return model_to_uint8(samples)
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"samples must be a torch.Tensor or a numpy array, got {type(samples).__name__}")
    if samples.dtype != np.uint8:
        raise TypeError(f"a samples array must be uint8 in [0, 255], got dtype {samples.dtype}")
    if samples.ndim != 3 or samples.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(samples) == 0:
        raise ValueError(f"a samples array must have shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}) with N >= 1, got {samples.shape}")
    return samples


# ------------------------------------------------------------------------------------------
# 8. Pictures (matplotlib Figures, made without pyplot so nothing leaks or pops up)
# ------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _show(ax, image: torch.Tensor | np.ndarray, title: str | None = None) -> None:
    data = image.detach().float().cpu().squeeze().numpy() if isinstance(image, torch.Tensor) else np.squeeze(image)
    ax.imshow(data, cmap="gray", vmin=-1 if isinstance(image, torch.Tensor) else 0, vmax=1 if isinstance(image, torch.Tensor) else 255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def plot_grid(images: torch.Tensor, titles: Sequence[str] | None = None, columns: int = 8, title: str | None = None):
    """A grid of images in [-1, 1], optionally titled one by one."""
    rows = math.ceil(len(images) / columns)
    fig = _figure(columns * 1.1, rows * 1.2 + (0.3 if title else 0))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < len(images):
            _show(ax, images[k], titles[k] if titles else None)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def plot_forward_process(schedule: NoiseSchedule, x0: torch.Tensor, ts: Sequence[int] = (0, 50, 100, 200, 400, 600, 800, 999), seed: int = 0):
    """One image (1, 1, 64, 64) noised to each t in ts with q(x_t | x_0), one shared noise draw."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    fig = _figure(len(ts) * 1.2 + 1.2, 1.6)
    axes = fig.subplots(1, len(ts) + 1)
    _show(axes[0], x0[0], "x_0")
    for ax, t in zip(axes[1:], ts):
        x_t = schedule.add_noise(x0, noise, torch.tensor([t]))
        _show(ax, x_t[0].clamp(-1, 1), f"t={t}\nᾱ={float(schedule.alpha_bars[t]):.3f}")
    return fig


def plot_backward_process(result: SampleResult, rows: int = 4, show_x0: bool = True):
    """Samples (rows) at the saved intermediate steps (columns): x_t, and the predicted x_0 beside it."""
    columns = len(result.timesteps)
    per_step = 2 if show_x0 else 1
    fig = _figure(columns * per_step * 1.0 + 0.5, rows * 1.15 + 0.5)
    axes = fig.subplots(rows, columns * per_step, squeeze=False)
    for r in range(rows):
        for c, t in enumerate(result.timesteps):
            _show(axes[r, c * per_step], result.x_t[c][r].clamp(-1, 1), f"x_t, t={t}" if r == 0 else None)
            if show_x0:
                _show(axes[r, c * per_step + 1], result.x0[c][r], "predicted x_0" if r == 0 else None)
    fig.suptitle("Backward process: from pure noise (left) to a shape (right)")
    return fig


def plot_losses(losses: Sequence[float], smooth: int = 50):
    """Loss per step (faint) and its running mean."""
    fig = _figure(6, 3)
    ax = fig.subplots()
    values = np.asarray(losses, dtype=np.float64)
    ax.plot(values, alpha=0.3, lw=0.8, label="per step")
    if len(values) >= smooth:
        ax.plot(np.arange(smooth - 1, len(values)), np.convolve(values, np.ones(smooth) / smooth, mode="valid"), label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def plot_schedules(timesteps: int = 1000):
    """alpha_bar_t and log SNR for the linear and cosine schedules."""
    fig = _figure(9, 3)
    left, right = fig.subplots(1, 2)
    for kind in SCHEDULES:
        schedule = NoiseSchedule.create(kind, timesteps)
        left.plot(schedule.alpha_bars.numpy(), label=kind)
        right.plot(schedule.snr.log10().numpy(), label=kind)
    left.set_title("signal kept: ᾱ_t")
    right.set_title("log10 SNR = log10(ᾱ_t / (1 - ᾱ_t))")
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.legend()
    return fig


def plot_time_embedding(dim: int = 32, timesteps: int = 1000):
    """The sinusoidal features of every timestep, as a heat map."""
    fig = _figure(7, 3)
    ax = fig.subplots()
    image = ax.imshow(sinusoidal_embedding(torch.arange(timesteps), dim).T.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("feature")
    ax.set_title("Sinusoidal time embedding (input to the time MLP)")
    fig.colorbar(image, ax=ax)
    return fig


# ------------------------------------------------------------------------------------------
# 9. Checkpoints: atomic writes, safe loads, clear errors
# ------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | os.PathLike, trainer: Trainer) -> Path:
    """Write model, EMA, optimiser, step, RNG and configs; atomically (temp file, fsync, rename).

    A crash or kill at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": dataclasses.asdict(trainer.model_config),
        "train_config": dataclasses.asdict(trainer.train_config),
        "state": trainer.state_dict(),
    }
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's contents, loaded with weights_only=True: no pickled code can run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; random or cut-off bytes are not one
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or another format): not a zip archive")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load, it holds pickled objects that are not plain weights ({str(error).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or another format): {str(error).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a diffusion_patterns checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return payload


def _configs_from(payload: dict, path: Path) -> tuple[ModelConfig, TrainConfig]:
    try:
        train = {"min_snr_form": "paper", **payload["train_config"]}  # files from before the field trained with "paper"
        return ModelConfig(**payload["model_config"]), TrainConfig(**train)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its configuration is invalid: {error}") from None


def load_trainer(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    expect: ModelConfig | None = None,
    data: torch.Tensor | None = None,
    compile: bool | None = None,
    precision: str | None = None,
) -> Trainer:
    """Rebuild a Trainer from a checkpoint to resume training (or to sample from its EMA).

    compile, when given, replaces the saved TrainConfig.compile: it changes speed, not results.
    The precision is this device's (choose_precision) unless given, as in Trainer: a run may
    continue on another kind of device. An fp16 run's gradient-scaler state carries over when
    the resumed run is fp16 too.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    model_config, train_config = _configs_from(payload, path)
    if compile is not None:
        train_config = dataclasses.replace(train_config, compile=compile)
    if expect is not None and expect != model_config:
        differences = {k: (v, getattr(expect, k)) for k, v in dataclasses.asdict(model_config).items() if getattr(expect, k) != v}
        raise CheckpointError(
            f"{path}: made by a different model configuration: " + ", ".join(f"{k}={a!r} in the file, {b!r} expected" for k, (a, b) in differences.items())
        )
    trainer = Trainer(model_config, train_config, device=device, data=data, precision=precision)
    try:
        trainer.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match its model: {_first_mismatch(error)}") from None
    return trainer


def _first_mismatch(error: Exception) -> str:
    """'Error(s) in loading state_dict ...:' plus its first detail line, cut to 300 characters."""
    return " ".join(line.strip() for line in str(error).splitlines()[:2])[:300]


def load_model(path: str | os.PathLike, device: torch.device | str | None = None, prefer_ema: bool = True) -> tuple[UNet, NoiseSchedule]:
    """The sampling network (EMA weights when saved) and its schedule, ready for `sample`."""
    path = Path(path)
    payload = read_checkpoint(path)
    model_config, _ = _configs_from(payload, path)
    state = payload["state"]
    weights = state["ema"] if prefer_ema and state.get("ema") is not None else state["model"]
    model = UNet(model_config)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match its model: {_first_mismatch(error)}") from None
    return model.to(pick_device(str(device) if device is not None else None)).eval(), NoiseSchedule.from_config(model_config)


# ------------------------------------------------------------------------------------------
# 10. Command line: python diffusion_utils.py {train, sample, evaluate}
# ------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="diffusion_utils.py", description="Train, sample and evaluate the shapes DDPM.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    train = commands.add_parser("train", help="train a model (defaults: the best recipe for the device)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock training budget")
    budget.add_argument("--steps", type=int, help="number of optimiser steps")
    train.add_argument("--out", required=True, help="checkpoint path (written atomically)")
    train.add_argument("--resume", help="continue from this checkpoint")
    train.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: the fastest available)")
    train.add_argument("--seed", type=int, help="seed of a new run (default 0); a resumed run keeps its own")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (long GPU runs)")
    precision_help = "default: the device's best (fp32, TF32 maths on Ampere+; fp16 on older GPUs)"
    train.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    train.add_argument("--no-progress", action="store_true")

    sample_cmd = commands.add_parser("sample", help="generate images from a checkpoint")
    sample_cmd.add_argument("--checkpoint", required=True)
    sample_cmd.add_argument("--n", type=int, default=64)
    sample_cmd.add_argument("--steps", type=int, default=100)
    sample_cmd.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    sample_cmd.add_argument("--eta", type=float, help="DDIM noise (default 0 for ddim)")
    sample_cmd.add_argument("--seed", type=int, default=0)
    sample_cmd.add_argument("--batch-size", type=int, default=256)
    sample_cmd.add_argument("--device")
    sample_cmd.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    sample_cmd.add_argument("--out", required=True, help="a .npy file of uint8 images (N, 64, 64)")
    sample_cmd.add_argument("--png", help="also save a grid of (up to 64) samples as a PNG")
    sample_cmd.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="print shape metrics of a samples .npy as JSON")
    evaluate.add_argument("samples")
    return parser


def _command_train(args: argparse.Namespace) -> None:
    if args.minutes is None and args.steps is None:
        raise ValueError("give a training budget: --minutes M or --steps N")
    if args.resume:
        if args.seed is not None:
            raise ValueError("--seed starts a new run; a resumed run continues its own random stream (drop --seed or --resume)")
        trainer = load_trainer(args.resume, device=args.device, compile=args.compile or None, precision=args.precision)
        print(f"resuming from {args.resume} at step {trainer.step}")
    else:
        device = pick_device(args.device)
        model_config, train_config = default_configs(device)
        train_config = dataclasses.replace(train_config, seed=0 if args.seed is None else args.seed, compile=args.compile)
        trainer = Trainer(model_config, train_config, device=device, precision=args.precision)
    print(f"{describe_model(trainer.model)}; device {trainer.device}, precision {trainer.precision}")
    trainer.train(steps=args.steps, minutes=args.minutes, progress=not args.no_progress, checkpoint_path=args.out, checkpoint_every=args.checkpoint_every)
    final = f"final loss {trainer.losses[-1]:.4f}" if trainer.losses else "no step fitted in the budget"
    print(f"trained to step {trainer.step} ({trainer.images_seen} images); {final}; saved {args.out}")


def _command_sample(args: argparse.Namespace) -> None:
    if not args.out.endswith(".npy"):
        raise ValueError(f"--out must end in .npy, got {args.out!r}")
    model, schedule = load_model(args.checkpoint, device=args.device)
    result = sample(
        model,
        schedule,
        args.n,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        precision=args.precision,
    )
    images = model_to_uint8(result.images)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, images)
    print(f"saved {len(images)} samples to {args.out}")
    if args.png:
        plot_grid(result.images[:64], title=f"{args.sampler}, {args.steps} steps").savefig(args.png, dpi=100)
        print(f"saved a grid to {args.png}")


def _command_evaluate(args: argparse.Namespace) -> None:
    path = Path(args.samples)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        images = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:  # pickled, empty, truncated or not .npy at all
        raise ValueError(f"{path}: not a plain .npy array ({error})") from None
    print(json.dumps(evaluate_samples(images), indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": _command_train, "sample": _command_sample, "evaluate": _command_evaluate}[args.command]
    try:
        command(args)
    except (ValueError, TypeError, OSError) as error:  # bad input: arguments, files, paths
        print(f"diffusion_utils.py {args.command}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:  # a failed run, not a usage error
        print(f"diffusion_utils.py {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
