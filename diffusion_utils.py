"""diffusion_utils: a small, complete DDPM that learns to draw circles and squares.

Read it top to bottom; sections 1-11 follow the notebook `diffusion_patterns.ipynb`, with its numbering (its
section on flow matching draws on 4, 6 and 7; 12 and 13 are still to come in the notebook):

1. Setup                  which device, precision and kernels (`setup`, once per Trainer or sampling call)
2. Configuration          two dataclasses hold every choice; `default_configs` is the measured recipe per device
3. The data               64x64 grayscale shapes drawn with OpenCV, values in [-1, 1], what was drawn, and captions
4. The forward process    beta_t, alpha_bar_t, q(x_t | x_0) in closed form; eps, v, x_0, velocity; rectified flow
5. The U-Net              a time- (and optionally request- or prompt-) conditioned network that predicts eps or v
6. Training               the weighted MSE and flow matching, one training step (Algorithm 1), EMA, the plan
7. Sampling               the sampling loop (Algorithm 2), the denoiser, DDPM and DDIM steps, the sampler registry
8. The backward process   pictures and an animation of x_t and x_0_hat along the way
9. Evaluation             objective shape metrics: valid share, circle share, blur, size and position spread
10. Fewer steps           DPM-Solver++(2M) and Heun on the probability-flow ODE, spherical interpolation of noise
11. Asking for a shape    requests and prompts, classifier-free guidance, and whether samples obey (word by word)
12. Editing               SDEdit from a sketch, inpainting (replacement, RePaint), DDIM inversion; sketches and masks
13. Fewer steps by tuning a trained model tuned to sample in 1-4 evaluations: consistency, progressive, reflow
A. Saving and loading     atomic checkpoints with the run's plan, safe loads (no unpickling), clear errors
B. Running fast           device, precision, TF32 and fused-optimiser policy
C. Command line           train / distill / sample / edit / inpaint / evaluate without Jupyter

The schedule (section 4), the network (section 5) and the samplers (sections 7 and 10) are kept apart, as in Hugging
Face diffusers, so each can be read and swapped alone. Measured figures behind the defaults are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import pickle
import re
import sys
import tempfile
import textwrap
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
SCHEDULES = ("linear", "cosine", "flow")
PREDICTIONS = ("eps", "v", "x0", "velocity")
OBJECTIVES = ("diffusion", "flow")  # the two recipes `default_configs` knows; "flow" = rectified flow
# The objective that reaches a given quality sooner on the 2-core CPU, at 5 and 15 minutes over two seeds
# (benchmarks/RESULTS.md, "Diffusion or flow matching?"); the other is one argument (--objective) away.
DEFAULT_OBJECTIVE = "flow"
TIME_SAMPLINGS = ("uniform", "logit-normal", "shifted")
TIME_SHIFT = 3.0  # "shifted" times: SD3's shift for 1024-pixel images (Esser et al. 2024, section 5.3.2)
TIME_INJECTIONS = ("every_block", "bottleneck")
MIN_SNR_FORMS = ("cap", "paper")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
CONDITIONINGS = ("request", "prompt")  # what a conditional model reads: three numbers, or words (sections 11 and 14)
TEXT_POSITIONS = ("rotary", "learned")  # how the text encoder tells word order (TextEncoder)
ROTARY_BASE = 10000.0  # RoPE's base period (Su et al. 2021), as in the paper and LLaMA
CHECKPOINT_FORMAT = "diffusion_patterns/2"  # /1 files still load (section A)
# Sampling defaults, chosen by measurement (benchmarks/RESULTS.md): the sampler, its network evaluations, and the
# classifier-free guidance scale for requests (section 11)
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "ddpm", 100, 1.0
# and for prompts (section 14): at guidance 1 a 15-minute prompt model obeys each kind of word 3-12 points less often
# than at 3, as valid (RESULTS.md, "Prompts"); guidance costs twice the network passes
DEFAULT_PROMPT_GUIDANCE = 3.0


# ------------------------------------------------------------------------------------------
# 1. Setup: which device
# ------------------------------------------------------------------------------------------


def pick_device(preferred: torch.device | str | None = None) -> torch.device:
    """The given device, else the fastest available one: CUDA, then Apple MPS, then CPU."""
    if preferred is not None:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"device {str(device)!r} was asked for but there are only {count} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and how the maths runs, decided once by `setup` for a Trainer or a `sample` call (section B says why
    each choice is made). It changes no process-wide setting outside its `compute()` context."""

    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16"
    fused_adamw: bool | None  # AdamW's fused kernel, or None for PyTorch's own choice

    def compute(self) -> contextlib.AbstractContextManager:
        """The context for a training or sampling loop: TF32 maths for fp32 on a CUDA card, restored on exit."""
        return tf32_maths(self.device.type == "cuda" and self.precision == "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for a forward pass: mixed precision in bf16 or fp16, nothing in fp32."""
        return autocast_for(self.device, self.precision)


def setup(device: torch.device | str | None = None, precision: str | None = None) -> Runtime:
    """The device (pick_device), its precision (check_precision: the device's best unless given) and kernels."""
    device = pick_device(device)
    return Runtime(device, check_precision(device, precision), fused_adamw(device))


def show_source(obj: object):
    """The source code of a function or class of this module, highlighted in Jupyter: the lines that do the work."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a Figure as a PNG (folders made as needed) and return its path; show that file, and what is shown is
    exactly what was saved."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    shrink_png(path)
    return path


def shrink_png(path: str | os.PathLike) -> None:
    """Rewrite a PNG with a 256-colour palette: a figure has few colours, so it looks the same at about half the
    bytes, and the committed notebook, which embeds every figure, stays small. (Pillow comes with matplotlib.)"""
    from PIL import Image as PillowImage

    with PillowImage.open(path) as image:
        palette = image.convert("RGB").quantize(colors=256)
    palette.save(path, optimize=True)


# ------------------------------------------------------------------------------------------
# 2. Configuration
# ------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Everything needed to rebuild a trained model and sample from it (saved in checkpoints).

    The defaults are the CPU diffusion recipe (`default_configs("cpu", "diffusion")`); the GPU recipe is wider, and
    the flow recipe changes the schedule and the prediction.
    """

    schedule: str = "cosine"  # "linear" (Ho et al. 2020), "cosine" (Nichol & Dhariwal 2021) or "flow" (section 4)
    num_timesteps: int = 1000  # T, the number of noising steps of the forward process
    prediction: str = "v"  # the network's output: "eps" (the noise), "v" (Salimans & Ho 2022), "x0", "velocity"
    base_channels: int = 24  # width of the first U-Net level
    channel_mults: tuple[int, ...] = (1, 2)  # width multiplier per level; each level halves the size
    blocks_per_level: int = 1  # residual blocks per level
    pixel_unshuffle: int = 4  # 1 = the full 64x64 input; 2 = a 32x32x4 stem; 4 = 16x16x16 (16x cheaper)
    time_injection: str = "every_block"  # where the time embedding enters; "bottleneck" = the original design
    bottleneck_attention: bool = True  # self-attention between the two bottleneck blocks (global context)
    conditional: bool = True  # also take a request (class, centre, size) or a prompt, see section 11
    dropout: float = 0.0
    conditioning: str = "request"  # what a conditional model reads: "request" (three numbers) or "prompt" (words)
    text_width: int = 64  # a prompt model's text encoder: the width of its token vectors (section 5)
    text_layers: int = 2  # and its transformer layers
    # and how it tells word order: "rotary" (RoPE) or "learned" (TextEncoder); rotary, as measured: held-out phrasings
    # obeyed as well as seen ones (RESULTS.md, "Prompts")
    text_positions: str = "rotary"
    # decoder levels, from the coarsest, that read the prompt (None: all): the coarsest, as measured (RESULTS.md,
    # "Prompts"); with four heads, every level obeyed no better and cost 1.53-1.54x a request step against 1.35x
    cross_attention_levels: int | None = 1
    # cross-attention queries also carry each pixel's place in the frame (section 5): at shifted times, guidance 3,
    # two seeds, learned text positions: exact places 1.1-2.3 px off, 2.1-4.2 px without (RESULTS.md, "Prompts")
    query_positions: bool = True
    # heads of every attention layer (the bottleneck's, the cross-attention's, the text encoder's). On a CPU each head
    # is its own small product; a prompt model (default_configs: two) trains at 1.19x a request step with one head,
    # 1.24x with two, 1.35x with four, and places its shapes 1.3-1.8, 0.7-1.4 and 0.4-0.7 px off (RESULTS.md)
    attention_heads: int = 4

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        if self.schedule == "flow" and self.prediction != "velocity":
            raise ValueError(
                f"the flow schedule learns the velocity eps - x_0: prediction 'velocity', got {self.prediction!r}"
            )
        _check_choice("time_injection", self.time_injection, TIME_INJECTIONS)
        _check_positive_int("num_timesteps", self.num_timesteps)
        _check_positive_int("base_channels", self.base_channels)
        if self.base_channels % 4:
            raise ValueError(
                "base_channels must be a multiple of 4 (the time embedding is split in halves), "
                f"got {self.base_channels}"
            )
        _check_positive_int("blocks_per_level", self.blocks_per_level)
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.pixel_unshuffle not in (1, 2, 4):
            raise ValueError(f"pixel_unshuffle must be 1, 2 or 4, got {self.pixel_unshuffle}")
        lowest = IMAGE_SIZE // self.pixel_unshuffle // 2 ** (len(self.channel_mults) - 1)
        if lowest < 2:
            raise ValueError(
                f"channel_mults {self.channel_mults}: {len(self.channel_mults)} levels after pixel_unshuffle "
                f"{self.pixel_unshuffle} shrink the image below 2x2"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_choice("conditioning", self.conditioning, CONDITIONINGS)
        _check_positive_int("text_layers", self.text_layers)
        _check_choice("text_positions", self.text_positions, TEXT_POSITIONS)
        _check_positive_int("text_width", self.text_width)
        if self.cross_attention_levels is not None and not 0 <= self.cross_attention_levels <= len(self.channel_mults):
            raise ValueError(
                f"cross_attention_levels must be None or 0-{len(self.channel_mults)} (the decoder's levels), "
                f"got {self.cross_attention_levels}"
            )
        _check_positive_int("attention_heads", self.attention_heads)
        for name, width in [("base_channels", self.base_channels), ("text_width", self.text_width)]:
            if width % self.attention_heads:
                raise ValueError(f"{name} must be a multiple of attention_heads ({self.attention_heads}), got {width}")
        if self.text_positions == "rotary" and self.text_width // self.attention_heads % 2:
            raise ValueError(
                f"text_width / attention_heads must be even with rotary positions (RoPE turns pairs of numbers), got "
                f"{self.text_width} / {self.attention_heads}"
            )


@dataclass
class TrainConfig:
    """How to train: optimiser, learning-rate schedule, loss weighting, EMA and data (saved in checkpoints).

    The defaults are the CPU diffusion recipe (`default_configs("cpu", "diffusion")`).
    """

    batch_size: int = 32
    lr: float = 2e-3  # the peak learning rate, reached after the warm-up
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # after the warm-up: "cosine" decay to 0 at the end of the budget, or "constant"
    time_sampling: str = "uniform"  # how training draws t: one of TIME_SAMPLINGS (training_times, training_timesteps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    min_snr_gamma: float | None = 5.0  # None = plain MSE (the original design)
    min_snr_form: str = "cap"  # how gamma enters the weight, see NoiseSchedule.loss_weights
    ema_decay: float | None = 0.998  # None = no EMA (the original design)
    condition_dropout: float = 0.5  # conditional models: chance that each field of a request is hidden in training
    seed: int = 0
    log_every: int = 10  # read the loss back from the device every N steps (no host-device sync in between)
    channels_last: bool = True  # activations in NHWC memory layout: faster convolutions on a CPU (section B)
    data_workers: int = 0  # background processes drawing shapes (a GPU outpaces one CPU core)
    compile_model: bool = False  # torch.compile the training forward pass (long GPU runs)

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("log_every", self.log_every)
        if isinstance(self.data_workers, bool) or not isinstance(self.data_workers, int) or self.data_workers < 0:
            raise ValueError(f"data_workers must be an integer >= 0, got {self.data_workers!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        _check_choice("min_snr_form", self.min_snr_form, MIN_SNR_FORMS)
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {self.condition_dropout}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def default_configs(
    device: torch.device | str, objective: str = DEFAULT_OBJECTIVE, conditioning: str = "request"
) -> tuple[ModelConfig, TrainConfig]:
    """The project's measured recipe for this kind of device (benchmarks/RESULTS.md), for an objective and for what
    the model reads.

    A CPU is compute-bound, so a narrow network that sees many images per minute wins there; a GPU has compute to
    spare and takes a wider, deeper one with large batches. MPS takes the CPU recipe (unmeasured). "diffusion" is the
    cosine schedule with v and capped min-SNR; "flow" is rectified flow on the same network and optimiser, learning
    the velocity with plain MSE at uniform times. Not SD3's logit-normal times: they rarely train the noisiest
    times, where a sample's layout is decided, and a flow trained so draws valid shapes but puts them where its noise
    says, not where a request or prompt asks (15.2-15.9 px off, against 0.8 px at uniform times; RESULTS.md).

    A model that reads prompts trains at times shifted further towards the noise ("shifted"): words are learned where
    the layout is decided. For the flow, over two seeds at 15 minutes, exact places went from 10-12 px off to 2-4 px,
    and the size words from 80-87 % obeyed to 93-100 %; for DDPM's objective at the notebook's 7.5 minutes, exact
    places from 10-11 px to 2-5 px (RESULTS.md, "Prompts"). Requests, given as numbers, need no shift.
    A prompt model's attention layers have two heads, not four (measured on the flow): on a 2-core CPU a step then
    costs 1.24x a request step, not 1.35x, and places come 0.7-1.4 px off on average, not 0.4-0.7 px, within the
    target of 1.5 px (ModelConfig.attention_heads).
    """
    device = torch.device(device)
    _check_choice("objective", objective, OBJECTIVES)
    _check_choice("conditioning", conditioning, CONDITIONINGS)
    if device.type == "cuda":
        model = ModelConfig(base_channels=64, channel_mults=(1, 2, 2), blocks_per_level=2, pixel_unshuffle=2)
        workers = min(4, max(1, (os.cpu_count() or 2) - 1))
        train = TrainConfig(batch_size=256, lr=1e-3, ema_decay=0.999, channels_last=False, data_workers=workers)
    else:
        model, train = ModelConfig(), TrainConfig(channels_last=device.type == "cpu")
    if objective == "flow":
        model = dataclasses.replace(model, schedule="flow", prediction="velocity")
        train = dataclasses.replace(train, min_snr_gamma=None, time_sampling="uniform")
    if conditioning == "prompt":
        model = dataclasses.replace(model, conditioning="prompt", attention_heads=2)
        train = dataclasses.replace(train, time_sampling="shifted")
    return model, train


def default_training_minutes(device: torch.device | str, capability: tuple[int, int] | None = None) -> float:
    """The notebook's training budget when none is given: long enough for clean shapes, short enough for a learner.

    Ampere and newer GPUs: 3 minutes. Older GPUs such as Colab's T4: 7 minutes (an estimate from their bandwidth and
    fp16 rate, not a measurement). CPU and MPS: 7.5 minutes, between the time-to-quality points of 5 minutes (about
    94 % valid on a 2-core CPU) and 15 (about 98 %), so that the whole notebook runs within 10 minutes there. Pass
    `capability` to test the rule without a GPU.
    """
    if torch.device(device).type != "cuda":
        return 7.5
    return 3 if is_ampere_or_newer(device, capability) else 7


def original_design_configs(like: tuple[ModelConfig, TrainConfig] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The design this project started from, with the network size and batch of `like` (default: the CPU recipe).

    Linear schedule, eps target, time added only at the bottleneck, no attention, no conditioning, uniform timesteps,
    plain MSE, a constant learning rate and no EMA; it was meant to be sampled with 1000 DDPM steps.
    """
    model, train = like or default_configs("cpu", "diffusion")
    model = dataclasses.replace(
        model,
        schedule="linear",
        prediction="eps",
        time_injection="bottleneck",
        bottleneck_attention=False,
        conditional=False,
    )
    changes = {"min_snr_gamma": None, "ema_decay": None, "lr_schedule": "constant", "time_sampling": "uniform"}
    return model, dataclasses.replace(train, **changes)


# ------------------------------------------------------------------------------------------
# 3. The data: one filled white circle or square on black, drawn with OpenCV
# ------------------------------------------------------------------------------------------

SIZE_RANGE = (15, 39)  # diameter of circles / side of squares, in pixels, both ends included
MARGIN = 4  # every shape stays at least this many pixels away from the border


@dataclass(frozen=True)
class ShapeClass:
    """One class of shape, declared once: how OpenCV draws it, the sizes it takes, and its ideal form (section 9).

    Every class is drawn around an anchor pixel (x, y): a shape `size` pixels across spans x - (size - 1) // 2 to
    x + size // 2, and likewise in y. Its geometric centre is then the anchor, or half a pixel further right and down
    when the size is even (`center_offset`), the same rule for every class. The reader compares a blob with each
    class's ideal shape of the blob's area: `ideal` is that shape as a mask of the pixel offsets (dx, dy) from the
    blob's centroid, and `size_of_area` the size at which it covers `area` pixels.
    """

    name: str
    odd_sizes: bool  # True: only odd sizes 2r + 1 (a middle pixel and r on each side)
    draw: Callable[[np.ndarray, int, int, int], object]  # (image, x, y, size): fills the shape in white, in place
    ideal: Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (dx, dy, size) -> bool mask
    size_of_area: Callable[[float], float]

    def random_sizes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n sizes, uniform over the ones this class takes within SIZE_RANGE."""
        low, high = SIZE_RANGE
        if self.odd_sizes:
            return 2 * rng.integers((low - 1) // 2, (high - 1) // 2 + 1, size=n) + 1
        return rng.integers(low, high + 1, size=n)

    def drawable_size(self, size: float) -> int:
        """The size it is drawn at when `size` is asked: rounded, and down to an odd one if it takes only those."""
        whole = int(round(size))
        return 2 * ((whole - 1) // 2) + 1 if self.odd_sizes else whole


# The classes of shape, in label order: a label is an index into SHAPES.
SHAPES = (
    ShapeClass(
        "circle",  # cv2.circle of radius r fills the pixels within r of the anchor: 2r + 1 across
        odd_sizes=True,
        draw=lambda image, x, y, size: cv2.circle(image, (x, y), (size - 1) // 2, 255, -1, lineType=cv2.LINE_8),
        ideal=lambda dx, dy, size: dx**2 + dy**2 <= (size / 2) ** 2,
        size_of_area=lambda area: 2 * math.sqrt(area / math.pi),  # area = pi (size / 2)^2
    ),
    ShapeClass(
        "square",  # axis-aligned; its corners are pixels, both included
        odd_sizes=False,
        draw=lambda image, x, y, size: cv2.rectangle(
            image, (x - (size - 1) // 2, y - (size - 1) // 2), (x + size // 2, y + size // 2), 255, thickness=-1
        ),
        ideal=lambda dx, dy, size: (np.abs(dx) <= size / 2) & (np.abs(dy) <= size / 2),
        size_of_area=math.sqrt,  # area = size^2
    ),
)
CLASS_NAMES = tuple(shape.name for shape in SHAPES)
CIRCLE, SQUARE = CLASS_NAMES.index("circle"), CLASS_NAMES.index("square")


def center_offset(size: int | np.ndarray) -> float | np.ndarray:
    """How far right of (and below) its anchor pixel a shape's geometric centre lies: half a pixel when the size is
    even, since its middle then falls between two pixels; none when it is odd."""
    return 0.5 * (size % 2 == 0)


@dataclass(frozen=True)
class RequestField:
    """One field of a request, declared once: what it holds, what the data can show, how the U-Net embeds it, how the
    reader reads it back from a sample and how that is scored, and how it is asked for on the command line.

    A categorical field (it has `categories`) holds an index per image, -1 where it is not given, and is embedded by
    an nn.Embedding with one more row for "not given" (as diffusers' `class_embed`). Any other field holds `width`
    numbers in pixels per image, NaN where not given, embedded by sinusoidal features of each number and an MLP, with
    a learned vector for "not given" (ConditionEmbedding).
    """

    name: str  # its key in Condition.given() and RequestScore.scores
    attribute: str  # its tensor in a Condition and its array in a ShapeBatch: condition.labels
    argument: str  # request()'s keyword and the command line's flag: request(n, shape="circle"), --shape circle
    module: str  # its layer in ConditionEmbedding (and "null_" + module, its "not given" vector): checkpoint keys
    check: Callable[[object, dict], object]  # (asked, everything asked by field name) -> the value held; raises
    read: Callable[[ShapeReading], object]  # what a sample shows
    score: Callable[[object, object], object]  # (shown, asked as drawn) -> right (bool) or an error in px
    metric: str  # evaluate_requests' key for the mean score
    words: Callable[[torch.Tensor], str]  # the value in describe_request
    flag: Callable[[], dict]  # the command line flag's argparse options
    width: int = 1  # numbers per image
    categories: Callable[[], Sequence[str]] | None = None  # the names of a categorical field's values

    @property
    def dtype(self) -> torch.dtype:
        return torch.long if self.categories is not None else torch.float32

    def null(self) -> float:
        """The value that means "not given"."""
        return -1 if self.categories is not None else math.nan

    def empty(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """n values, none given."""
        shape = (n,) if self.width == 1 else (n, self.width)
        return torch.full(shape, self.null(), dtype=self.dtype, device=device)

    def given(self, values: torch.Tensor) -> torch.Tensor:
        """A (N,) bool mask of the images for which this field is given."""
        if self.categories is not None:
            return values >= 0
        missing = values.isnan()
        return ~(missing.any(1) if self.width > 1 else missing)


def _check_shape(shape: str, asked: dict) -> int:
    names = [shape.name for shape in SHAPES]
    _check_choice("shape", shape, names)
    return names.index(shape)


def _check_size(size: float, asked: dict | None = None) -> float:
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ValueError(f"size must be within the data's {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px, got {size}")
    return float(size)


def _check_center(center: tuple[float, float], asked: dict) -> tuple[float, float]:
    """A centre is possible when the shape spans [c - (size-1)/2, c + (size-1)/2] within [MARGIN, 63 - MARGIN], for
    the asked size (checked first), or the smallest size when none is asked."""
    size = SIZE_RANGE[0] if asked.get("size") is None else _check_size(asked["size"])
    low, high = MARGIN + (size - 1) / 2, IMAGE_SIZE - 1 - MARGIN - (size - 1) / 2
    for axis, value in zip("xy", center):
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(
                f"a centre {axis} of {value} puts a {size:g} px shape outside the frame's {MARGIN} px margin; "
                f"it must lie in [{low:g}, {high:g}]"
            )
    return center


# The fields of a request, in the order of a Condition's tensors, of Condition.dropped's draws and of
# ConditionEmbedding's layers and sum (checkpoints depend on that order).
REQUEST_FIELDS = (
    RequestField(
        "class",
        attribute="labels",
        argument="shape",
        module="classes",
        check=_check_shape,
        read=lambda reading: reading.label,
        score=lambda shown, asked: shown == asked,  # right or wrong
        metric="class_accuracy",
        words=lambda label: SHAPES[int(label)].name,
        flag=dict,
        categories=lambda: [shape.name for shape in SHAPES],
    ),
    RequestField(
        "center",
        attribute="centers",
        argument="center",
        module="center",
        check=_check_center,
        read=lambda reading: reading.center,
        score=math.dist,  # px between the centres
        metric="center_error",
        words=lambda center: "at ({:g}, {:g})".format(*center.tolist()),
        flag=lambda: {"type": _parse_center, "help": "X,Y in pixels, e.g. 32,30"},
        width=2,
    ),
    RequestField(
        "size",
        attribute="sizes",
        argument="size",
        module="size",
        check=_check_size,
        read=lambda reading: reading.size,
        score=lambda shown, asked: abs(shown - asked),  # px
        metric="size_error",
        words=lambda size: f"{float(size):g} px",
        flag=lambda: {"type": float, "help": f"diameter or side in pixels, {SIZE_RANGE[0]}-{SIZE_RANGE[1]}"},
    ),
)
# The order in which a request is written: request()'s positional arguments, describe_request's words ("circle, 25
# px, at (30, 40)") and the command line's flags.
REQUEST_ORDER = ("class", "size", "center")


@dataclass
class ShapeBatch:
    """Images in [-1, 1] of shape (N, 1, 64, 64) and what was drawn in each."""

    images: torch.Tensor
    labels: np.ndarray  # the class: an index into SHAPES
    centers: np.ndarray  # (N, 2) geometric centre (x, y) in pixels
    sizes: np.ndarray  # diameter or side, in pixels

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: np.ndarray | slice) -> ShapeBatch:
        """The images at `index`, with what was drawn in each."""
        return ShapeBatch(self.images[index], self.labels[index], self.centers[index], self.sizes[index])

    def condition(self) -> Condition:
        """The request that each image answers: every field of REQUEST_FIELDS, as drawn (section 11)."""
        return Condition(*(torch.as_tensor(getattr(self, f.attribute), dtype=f.dtype) for f in REQUEST_FIELDS))


class Condition:
    """What to draw, one entry per image: a tensor per field of REQUEST_FIELDS, any of which may be left out for any
    image (the null condition).

    labels   (N,) long: the class, an index into SHAPES, or -1 where it is not given
    centers  (N, 2) float: the centre (x, y) in pixels, or NaN where it is not given
    sizes    (N,) float: the diameter or side in pixels, or NaN where it is not given
    Condition(labels, centers, sizes) takes them in the order of REQUEST_FIELDS, and `values` holds them by field
    name. A conditional U-Net learns all of them at once because training hides each field with some probability
    (`dropped`); an all-null Condition asks for any shape (section 11).
    """

    def __init__(self, *values: torch.Tensor) -> None:
        if len(values) != len(REQUEST_FIELDS):
            names = ", ".join(f.attribute for f in REQUEST_FIELDS)
            raise TypeError(f"a Condition holds one tensor per request field ({names}), got {len(values)}")
        self.values = {f.name: value for f, value in zip(REQUEST_FIELDS, values)}

    def __getattr__(self, attribute: str) -> torch.Tensor:
        """condition.labels, condition.centers, ...: a field's tensor by its RequestField.attribute."""
        for f in REQUEST_FIELDS:
            if f.attribute == attribute and "values" in self.__dict__:
                return self.values[f.name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.attribute}={self.values[f.name]!r}" for f in REQUEST_FIELDS)
        return f"Condition({fields})"

    @classmethod
    def null(cls, n: int, device: torch.device | str = "cpu") -> Condition:
        """n requests with nothing given: "draw any shape"."""
        return cls(*(f.empty(n, device) for f in REQUEST_FIELDS))

    def given(self) -> dict[str, torch.Tensor]:
        """Per f, a (N,) bool mask of the images for which it is given."""
        return {f.name: f.given(self.values[f.name]) for f in REQUEST_FIELDS}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Condition:
        return Condition(*(v.to(device, non_blocking=non_blocking) for v in self.values.values()))

    def pin_memory(self) -> Condition:  # called by DataLoader(pin_memory=True)
        return Condition(*(v.pin_memory() for v in self.values.values()))

    def select(self, index: torch.Tensor | slice) -> Condition:
        return Condition(*(v[index] for v in self.values.values()))

    def cat(self, other: Condition) -> Condition:
        return Condition(*(torch.cat([v, other.values[name]]) for name, v in self.values.items()))

    def replace(self, **tensors: torch.Tensor) -> Condition:
        """A copy with some fields' tensors replaced, by attribute: condition.replace(labels=1 - condition.labels)."""
        by_attribute = {f.attribute: self.values[f.name] for f in REQUEST_FIELDS}
        unknown = set(tensors) - set(by_attribute)
        if unknown:
            raise TypeError(f"a Condition has no f {', '.join(sorted(unknown))}")
        return Condition(*{**by_attribute, **tensors}.values())

    def dropped(self, p: float, generator: torch.Generator | None = None) -> Condition:
        """Each field of each request hidden with probability p, independently (condition dropout).

        With p = 0.5, every combination of given and hidden fields is trained on, so one network serves "anything",
        "a circle", "size 20", "a circle of 20 at (30, 30)"; "anything" is the unconditional model that guidance
        starts from and that draws when nothing is asked (section 11).
        """
        device = next(iter(self.values.values())).device
        # One row of draws per f, and one more that nothing reads: it keeps the training stream of random numbers
        # (these draws, then each step's timesteps and noise) the one of the runs measured in benchmarks/RESULTS.md.
        draws = torch.rand((len(REQUEST_FIELDS) + 1, len(self)), generator=generator, device=device)
        kept = []
        for f, row in zip(REQUEST_FIELDS, draws):
            values = self.values[f.name]
            hide = row < p if values.dim() == 1 else (row < p)[:, None]
            kept.append(torch.where(hide, torch.full_like(values, f.null()), values))
        return Condition(*kept)


# Prompts: the data in words. Stable Diffusion reads a prompt (Rombach et al. 2022, arXiv 2112.10752); here every
# training image gets a short English caption written from what was drawn, in varied templates and word orders, with
# each part (class, size, place) left out at random: that is condition dropout for classifier-free guidance, and the
# empty prompt is the unconditional model. The language is small enough to parse exactly (`read_prompt`), so the
# captions can be checked against their shapes and the samples scored word by word (section 14).

PROMPT_LENGTH = 16  # tokens a prompt may hold; the longest caption has 14 (a half pixel is a token: "30.5" = 30 .5)
FRAME_CENTER = (IMAGE_SIZE - 1) / 2  # 31.5: the frame's centre in pixel coordinates
CENTRE_RADIUS = 6.0  # px: a centre within this distance of the frame's is in the "centre"
# The size words and the largest size each covers: small <= 22 px, medium 23-31 px, large >= 32 px.
SIZE_WORDS = {"small": 22, "medium": 31, "large": IMAGE_SIZE}
# The half-frame words and the test on a centre (x, y) each stands for; a quadrant is a vertical and a horizontal one.
HALVES: dict[str, Callable[[float, float], bool]] = {
    "left": lambda x, y: x < FRAME_CENTER,
    "right": lambda x, y: x > FRAME_CENTER,
    "top": lambda x, y: y < FRAME_CENTER,
    "bottom": lambda x, y: y > FRAME_CENTER,
}
CENTRE_WORDS = ("centre", "center", "middle")
SIZE_UNITS = ("pixels", "px")
GLUE_WORDS = ("a", "an", "the", "in", "at", "on", "near", "of", "and", "corner", "frame", "image", "shape", "wide", ",")
HALF_PIXEL = ".5"  # the token that follows a number's whole part when it ends in .5: "30.5" = "30" ".5"
PAD = "<pad>"
# Every token, by id: the padding (id 0), the words, the whole numbers 0-63 in pixels and the half pixel.
VOCABULARY = (
    PAD,
    *CLASS_NAMES,
    *SIZE_WORDS,
    *HALVES,
    *CENTRE_WORDS,
    *SIZE_UNITS,
    *GLUE_WORDS,
    *(str(k) for k in range(IMAGE_SIZE)),
    HALF_PIXEL,
)
TOKEN_IDS = {token: k for k, token in enumerate(VOCABULARY)}
FIRST_NUMBER_ID = TOKEN_IDS["0"]  # ids FIRST_NUMBER_ID + k are the numbers k = 0..63 (the encoder reads their value)


def size_word(size: float) -> str:
    """The size word of a diameter or side in pixels: small, medium or large."""
    return next(word for word, largest in SIZE_WORDS.items() if size <= largest + 0.5)


def is_centre(center: tuple[float, float]) -> bool:
    """Whether a centre (x, y) is in the frame's centre: within CENTRE_RADIUS px of it."""
    return math.dist(center, (FRAME_CENTER, FRAME_CENTER)) <= CENTRE_RADIUS


def quadrant_of(center: tuple[float, float]) -> str | None:
    """ "top left", ... for a centre (x, y), None on a middle line (it is in no quadrant)."""
    vertical = [word for word in ("top", "bottom") if HALVES[word](*center)]
    horizontal = [word for word in ("left", "right") if HALVES[word](*center)]
    return f"{vertical[0]} {horizontal[0]}" if vertical and horizontal else None


def prompt_words(text: str) -> list[str]:
    """A prompt's words, lower-cased: runs of letters, numbers (with their decimals) and single marks such as commas.
    "A 25px circle, top-left" -> ["a", "25", "px", "circle", ",", "top", "-", "left"]."""
    return re.findall(r"\d+(?:\.\d*)?|[a-z]+|[^\s\w]", text.lower())


def _is_number(word: str) -> bool:
    return word[:1].isdigit()


def _known(word: str) -> bool:
    return word in TOKEN_IDS or _is_number(word)


def _vocabulary_line() -> str:
    return f"it knows: {' '.join(VOCABULARY[1:FIRST_NUMBER_ID])}, and numbers of pixels (whole or half: 30, 30.5)"


# The kinds of words a prompt may hold, and what each tells: one of each group at most.
PROMPT_GROUPS = {
    "class": "class",
    "size word": "size",
    "size": "size",
    "half": "place",
    "quadrant": "place",
    "centre": "place",
    "place": "place",
}


@dataclass(frozen=True)
class PromptAsk:
    """What a prompt asks for, read word by word; None (or False) where it says nothing of that kind.

    `order` lists the kinds of words in the order they are written ("size word", "class", "quadrant"), which tells a
    template's word order (held-out phrasings are word orders training never shows).
    """

    label: int | None = None  # "circle", "square": an index into SHAPES
    size_word: str | None = None  # "small", "medium", "large"
    size: float | None = None  # "25 px", "25 pixels wide": the exact size
    half: str | None = None  # "left", "right", "top", "bottom"
    quadrant: str | None = None  # "top left", ... ("corner" may follow)
    centre: bool = False  # "centre", "center", "middle"
    center: tuple[float, float] | None = None  # "at 30, 40": the exact centre
    order: tuple[str, ...] = ()


def read_prompt(text: str) -> PromptAsk:
    """Parse a prompt into what it asks (PromptAsk); a ValueError names an unknown word, a part asked twice, or a
    size or place the data cannot show (outside SIZE_RANGE, or a centre that puts the shape outside the frame)."""
    words = prompt_words(text)
    unknown = next((word for word in words if not _known(word)), None)
    if unknown is not None:
        raise ValueError(f"unknown word {unknown!r} in the prompt {text!r}; {_vocabulary_line()}")
    asked: dict[str, object] = {}
    order: list[str] = []

    def ask(kind: str, key: str, value: object) -> None:
        group = PROMPT_GROUPS[kind]
        if group in {PROMPT_GROUPS[seen] for seen in order}:
            raise ValueError(f"the prompt {text!r} asks for two {group}s; ask for each thing once")
        asked[key] = value
        order.append(kind)

    i = 0
    while i < len(words):
        word, after = words[i], words[i + 1 : i + 3]
        if _is_number(word):
            i = _read_number(text, words, i, ask)
            continue
        if word in CLASS_NAMES:
            ask("class", "label", CLASS_NAMES.index(word))
        elif word in SIZE_WORDS:
            ask("size word", "size_word", word)
        elif word in ("top", "bottom") and after[:1] and after[0] in ("left", "right"):
            ask("quadrant", "quadrant", f"{word} {after[0]}")
            i += 1
        elif word in HALVES:
            ask("half", "half", word)
        elif word in CENTRE_WORDS:
            ask("centre", "centre", True)
        i += 1
    if "center" in asked:
        _check_center(asked["center"], {"size": asked.get("size")})
    return PromptAsk(**asked, order=tuple(order))


def _read_number(text: str, words: list[str], i: int, ask: Callable[[str, str, object], None]) -> int:
    """Read the size ("25 px", "25 pixels wide") or the place ("at 30, 40") that starts or sits at words[i]; the index
    after it."""
    value = _pixels(text, words[i])
    if words[i + 1 : i + 2] and words[i + 1] in SIZE_UNITS:
        ask("size", "size", _check_size(value))
        return i + 2
    if i > 0 and words[i - 1] == "at" and words[i + 1 : i + 2] == [","] and words[i + 2 : i + 3]:
        if _is_number(words[i + 2]):
            ask("place", "center", (value, _pixels(text, words[i + 2])))
            return i + 3
    raise ValueError(f"the number {words[i]} in the prompt {text!r} is neither a size (25 px) nor a place (at 30, 40)")


def _pixels(text: str, word: str) -> float:
    value = float(word)
    if value * 2 != int(value * 2):
        raise ValueError(f"the number {word} in the prompt {text!r} is not a whole or half pixel (30 or 30.5)")
    return value


def prompt_tokens(text: str) -> list[int]:
    """The token ids of a prompt, checked: every word known (read_prompt), and at most PROMPT_LENGTH tokens."""
    read_prompt(text)
    tokens = _token_ids(text)
    if len(tokens) > PROMPT_LENGTH:
        raise ValueError(f"the prompt {text!r} is {len(tokens)} tokens long, more than the encoder's {PROMPT_LENGTH}")
    return tokens


def _token_ids(text: str) -> list[int]:
    """Token ids of known words, unchecked (the captions are written from the vocabulary): a number is its whole
    part, then HALF_PIXEL if it ends in .5."""
    tokens = []
    for word in prompt_words(text):
        if _is_number(word):
            value = float(word)
            tokens.append(TOKEN_IDS[str(int(value))])
            if value != int(value):
                tokens.append(TOKEN_IDS[HALF_PIXEL])
        else:
            tokens.append(TOKEN_IDS[word])
    return tokens


def prompt_token_names(text: str) -> list[str]:
    """The tokens of a prompt, as the encoder reads them: "at 30.5, 40" -> ["at", "30", ".5", ",", "40"]."""
    return [VOCABULARY[k] for k in prompt_tokens(text)]


class Prompt:
    """A batch of prompts as the U-Net reads them: (N, PROMPT_LENGTH) token ids, padded with 0, and their texts.

    It has the small interface of a Condition (null, given, select, cat, to, pin_memory, dropped), so training,
    sampling and guidance carry either one unchanged. The empty prompt (no tokens) asks for any shape.
    """

    def __init__(self, tokens: torch.Tensor, texts: Sequence[str]) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != PROMPT_LENGTH or len(tokens) != len(texts):
            raise ValueError(f"a Prompt holds (N, {PROMPT_LENGTH}) token ids and N texts, got {tuple(tokens.shape)}")
        self.tokens, self.texts = tokens, tuple(texts)

    @classmethod
    def of(cls, texts: Sequence[str], checked: bool = True) -> Prompt:
        """Prompts from their texts, each checked (prompt_tokens) unless they are captions written from the data."""
        tokens = torch.zeros(len(texts), PROMPT_LENGTH, dtype=torch.long)
        for k, text in enumerate(texts):
            ids = prompt_tokens(text) if checked else _token_ids(text)
            tokens[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return cls(tokens, texts)

    @classmethod
    def null(cls, n: int, device: torch.device | str = "cpu") -> Prompt:
        """n empty prompts: "draw any shape"."""
        return cls(torch.zeros(n, PROMPT_LENGTH, dtype=torch.long, device=device), [""] * n)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"Prompt({list(self.texts)!r})"

    @property
    def lengths(self) -> torch.Tensor:
        return (self.tokens != 0).sum(1)

    def given(self) -> dict[str, torch.Tensor]:
        """A (N,) bool mask of the prompts that say something."""
        return {"prompt": self.lengths > 0}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Prompt:
        return Prompt(self.tokens.to(device, non_blocking=non_blocking), self.texts)

    def pin_memory(self) -> Prompt:  # called by DataLoader(pin_memory=True)
        return Prompt(self.tokens.pin_memory(), self.texts)

    def select(self, index: torch.Tensor | slice) -> Prompt:
        texts = self.texts[index] if isinstance(index, slice) else [self.texts[int(k)] for k in index]
        return Prompt(self.tokens[index], texts)

    def cat(self, other: Prompt) -> Prompt:
        return Prompt(torch.cat([self.tokens, other.tokens]), self.texts + other.texts)

    def dropped(self, p: float, generator: torch.Generator | None = None) -> Prompt:
        """The prompts themselves: a caption already leaves each part out with probability p when it is written
        (`caption`), from the batch's own seed, so this draws nothing."""
        return self


def caption(
    label: int,
    size: float,
    center: tuple[float, float],
    rng: np.random.Generator,
    dropout: float = 0.0,
    held_out: bool = False,
) -> str:
    """A prompt for one drawn shape in one of the training templates (or, held_out, of HELD_OUT_TEMPLATES, every
    part given), each part (class, size, place) left out with probability `dropout`; all left out: "".

    "a small circle in the top left corner", "large square, bottom right", "in the middle a medium circle",
    "square 25 px wide at 30, 40". The words are true of the shape: its size word or exact size, and its half,
    quadrant, centre or exact centre, one of those true of it.
    """
    keep = np.ones(3, bool) if held_out else rng.random(3) >= dropout
    parts = {
        "noun": CLASS_NAMES[label] if keep[0] else "shape",
        "size": _size_part(size, rng) if keep[1] else None,
        "place": _place_part(center, rng) if keep[2] else None,
        "size_value": size,
    }
    if not keep.any():
        return ""
    templates = HELD_OUT_TEMPLATES if held_out else TEMPLATES
    words = templates[int(rng.integers(len(templates)))](parts, rng)
    return " ".join(word for word in words if word).replace(" ,", ",")


def _size_part(size: float, rng: np.random.Generator) -> tuple[str, str]:
    """("word", "small") or ("exact", "25 px wide")."""
    if rng.random() < 0.5:
        return "word", size_word(size)
    unit = ("px", "pixels wide", "px wide")[int(rng.integers(3))]
    return "exact", f"{size:g} {unit}"


def _place_part(center: tuple[float, float], rng: np.random.Generator) -> tuple[str, str]:
    """(the place with a preposition, the place bare): one of the place words true of the centre, or "at X, Y"."""
    x, y = float(center[0]), float(center[1])
    options = ["exact"] + (["half"] if any(test(x, y) for test in HALVES.values()) else [])
    options += (["quadrant"] if quadrant_of((x, y)) else []) + (["centre"] if is_centre((x, y)) else [])
    kind = options[int(rng.integers(len(options)))]
    if kind == "exact":
        return f"at {x:g}, {y:g}", f"at {x:g}, {y:g}"
    suffix = ("", "", "of the frame", "of the image")[int(rng.integers(4))]
    if kind == "half":
        halves = [word for word, test in HALVES.items() if test(x, y)]
        place = halves[int(rng.integers(len(halves)))]
    elif kind == "quadrant":
        place = quadrant_of((x, y)) + ("", " corner")[int(rng.integers(2))]
    else:
        place = CENTRE_WORDS[int(rng.integers(len(CENTRE_WORDS)))]
    preposition = ("in the", "on the", "at the", "near the")[int(rng.integers(4))]
    return f"{preposition} {place} {suffix}".strip(), f"{place} {suffix}".strip()


def _noun_phrase(parts: dict, rng: np.random.Generator, article: bool = True) -> list[str]:
    """[a|the] [size word] noun [exact size]: "a small circle", "the square 25 px wide"."""
    kind, words = parts["size"] or (None, "")
    determiner = ("a", "the", "")[int(rng.integers(3))] if article else ""
    return [determiner, words if kind == "word" else "", parts["noun"], words if kind == "exact" else ""]


def _place(parts: dict, bare: bool = False) -> str:
    return "" if parts["place"] is None else parts["place"][1 if bare else 0]


# The training templates: each writes the parts (noun, size, place) in one word order; a part left out is skipped.
TEMPLATES: tuple[Callable[[dict, np.random.Generator], list[str]], ...] = (
    # "a small circle in the top left corner", "an image of the square 25 px at 30, 40"
    lambda parts, rng: [("", "an image of")[int(rng.integers(2))], *_noun_phrase(parts, rng), _place(parts)],
    # "large square, bottom right"
    lambda parts, rng: [*_noun_phrase(parts, rng, article=False), "," if parts["place"] else "", _place(parts, True)],
    # "in the middle a medium circle"
    lambda parts, rng: [_place(parts), *_noun_phrase(parts, rng)],
    # "a circle, small and near the bottom of the frame"
    lambda parts, rng: [
        ("a", "the")[int(rng.integers(2))],
        parts["noun"],
        "," if parts["size"] else "",
        parts["size"][1] if parts["size"] else "",
        "and" if parts["size"] and parts["place"] else "",
        _place(parts),
    ],
)
# Phrasings training never shows, in word orders it never shows, for measuring whether the model learned the words
# rather than the templates (`held_out_prompts`).
HELD_OUT_TEMPLATES: tuple[Callable[[dict, np.random.Generator], list[str]], ...] = (
    # class, place, size: "a circle on the left, 25 pixels wide"
    lambda parts, rng: ["a", parts["noun"], _place(parts), ",", parts["size"][1]],
    # exact size before the noun: "a 25 px square in the top right corner"
    lambda parts, rng: ["a", f"{parts['size_value']:g} px", parts["noun"], _place(parts)],
    # place, class, size word: "bottom left, the square, large"
    lambda parts, rng: [_place(parts, True), ",", "the", parts["noun"], ",", size_word(parts["size_value"])],
)


def captions(batch: ShapeBatch, rng: np.random.Generator, dropout: float = 0.0, held_out: bool = False) -> list[str]:
    """A caption (`caption`) for every image of a batch."""
    return [
        caption(int(label), float(size), (float(center[0]), float(center[1])), rng, dropout, held_out)
        for label, size, center in zip(batch.labels, batch.sizes, batch.centers)
    ]


def caption_seed(seed: int | Sequence[int]) -> tuple[int, ...]:
    """The seed of a batch's captions: apart from the batch's own (make_shapes), so captioning takes no random
    number from the drawing of shapes, and the request recipe's stream stays the one measured."""
    return (*np.atleast_1d(seed).tolist(), 1)


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts in held-out phrasings (every part given), describing the shapes of make_shapes(n, seed): to
    measure a prompt model on word orders it never saw. `seen_prompts(n, seed)` describes the same shapes in
    training templates."""
    return captions(make_shapes(n, seed), np.random.default_rng(caption_seed(seed)), held_out=True)


def seen_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts in training templates with every part given, for the shapes of make_shapes(n, seed)."""
    return captions(make_shapes(n, seed), np.random.default_rng(caption_seed(seed)))


def prompt_of_request(condition: Condition) -> list[str]:
    """Each request as a prompt in exact words, rounded to half pixels: "circle 25 px wide at 30, 40" ("" asks for
    anything): so a prompt model takes a structured request through the same way in."""
    given = condition.given()
    texts = []
    for k in range(len(condition)):
        words = []
        if bool(given["class"][k]):
            words.append(CLASS_NAMES[int(condition.labels[k])])
        if bool(given["size"][k]):
            words.append(f"{_half_pixels(float(condition.sizes[k]))} px wide")
        if bool(given["center"][k]):
            x, y = (_half_pixels(float(v)) for v in condition.centers[k])
            words.append(f"at {x}, {y}")
        texts.append(" ".join(words))
    return texts


def _half_pixels(value: float) -> str:
    return f"{round(value * 2) / 2:g}"


def draw_shape(label: int, center: tuple[int, int], size: int) -> np.ndarray:
    """One 64x64 uint8 image: a filled, hard-edged (no anti-aliasing) white shape of class SHAPES[label] on black,
    drawn around the anchor pixel `center` (ShapeClass says how)."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    SHAPES[label].draw(image, int(center[0]), int(center[1]), int(size))
    return image


def make_shapes(n: int, seed: int | Sequence[int] = 0) -> ShapeBatch:
    """Draw n random shapes, of each class of SHAPES equally often, reproducibly from a seed.

    Size is uniform over the sizes of its class within SIZE_RANGE (circles: odd diameters 2r + 1), and the centre is
    uniform over the pixel positions that keep the whole shape MARGIN pixels inside the frame.
    """
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=n)
    sizes_by_class = np.stack([shape.random_sizes(rng, n) for shape in SHAPES])  # every class's sizes, n of each
    sizes = sizes_by_class[labels, np.arange(n)]
    low = MARGIN + (sizes - 1) // 2  # first pixel of the shape must be >= MARGIN
    high = IMAGE_SIZE - 1 - MARGIN - sizes // 2  # last pixel must be <= 63 - MARGIN
    anchors = rng.integers(low[:, None], high[:, None] + 1, size=(n, 2))
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i in range(n):
        images[i] = draw_shape(int(labels[i]), (int(anchors[i, 0]), int(anchors[i, 1])), int(sizes[i]))
    centers = anchors + center_offset(sizes)[:, None]
    return ShapeBatch(uint8_to_model(images), labels, centers, sizes.astype(np.float64))


class ShapeStream(torch.utils.data.IterableDataset):
    """Fresh procedural batches, a new set of shapes every step, so the model cannot memorise.

    Batch k is always make_shapes(batch_size, seed=(seed, k)): the stream is reproducible and resumes exactly from
    any step. With DataLoader workers, worker w draws steps w, w + W, ... and the loader interleaves them back in
    order, so a GPU never waits for OpenCV. Each item is (images, the Condition they answer), or with
    conditioning "prompt", (images, their captions as a Prompt), each part of a caption left out with probability
    `dropout` (`caption`, drawn from the batch's caption_seed).
    """

    def __init__(
        self, batch_size: int, seed: int = 0, start_step: int = 0, conditioning: str = "request", dropout: float = 0.0
    ) -> None:
        _check_positive_int("batch_size", batch_size)
        _check_choice("conditioning", conditioning, CONDITIONINGS)
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.conditioning, self.dropout = conditioning, dropout

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Condition | Prompt]]:
        worker = torch.utils.data.get_worker_info()
        step, stride = (self.start_step, 1) if worker is None else (self.start_step + worker.id, worker.num_workers)
        while True:
            batch = make_shapes(self.batch_size, seed=(self.seed, step))
            yield batch.images, batch_condition(batch, (self.seed, step), self.conditioning, self.dropout)
            step += stride


def batch_condition(
    batch: ShapeBatch, seed: int | Sequence[int], conditioning: str = "request", dropout: float = 0.0
) -> Condition | Prompt:
    """What a model learns to read from a batch: the request each image answers, or a caption of it."""
    if conditioning == "request":
        return batch.condition()
    texts = captions(batch, np.random.default_rng(caption_seed(seed)), dropout)
    return Prompt.of(texts, checked=False)


def training_batches(
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    conditioning: str = "request",
    dropout: float = 0.0,
) -> Iterator[tuple[torch.Tensor, Condition | Prompt]]:
    """Iterate over a ShapeStream, in `workers` background processes when workers > 0."""
    stream = ShapeStream(batch_size, seed, start_step, conditioning, dropout)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4
    )
    return iter(loader)


def fixed_batches(
    data: torch.Tensor | ShapeBatch,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    conditioning: str = "request",
    dropout: float = 0.0,
) -> Iterator[tuple[torch.Tensor, Condition | Prompt | None]]:
    """Random mini-batches from a fixed set (the classic epoch-based dataset), resumable by step.

    `data` is a ShapeBatch, or plain images (then there is no request to learn from: the Condition is None). With
    conditioning "prompt", each batch's images get fresh captions (batch_condition).
    """
    images = data.images if isinstance(data, ShapeBatch) else data
    validate_images(images)
    condition = data.condition() if isinstance(data, ShapeBatch) else None
    step = start_step
    while True:
        index = torch.from_numpy(np.random.default_rng((seed, step)).integers(0, len(images), batch_size))
        if condition is not None and conditioning == "prompt":
            yield images[index], batch_condition(data.select(index.numpy()), (seed, step), conditioning, dropout)
        else:
            yield images[index], condition.select(index) if condition is not None else None
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
        raise ValueError(
            f"images must have shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) with N >= 1, got {tuple(images.shape)}"
        )
    if check_range:
        low, high = images.min().item(), images.max().item()
        if not (math.isfinite(low) and math.isfinite(high)) or low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
            # 7 digits, so that 1.0002 does not print as "1"
            raise ValueError(f"images must lie in [-1, 1], got values in [{low:.7g}, {high:.7g}]")


def _figure(width: float, height: float):
    """A matplotlib Figure made without pyplot, so nothing leaks or pops up; the notebook shows it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _show(ax, image: torch.Tensor | np.ndarray, title: str | None = None) -> None:
    """One image on an axis without ticks: a tensor in [-1, 1] or a uint8 array in [0, 255]."""
    if isinstance(image, torch.Tensor):
        data, low, high = image.detach().float().cpu().squeeze().numpy(), -1, 1
    else:
        data, low, high = np.squeeze(image), 0, 255
    ax.imshow(data, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def plot_grid(
    images: torch.Tensor,
    titles: Sequence[str] | None = None,
    columns: int = 8,
    title: str | None = None,
    outline: Sequence[bool | None] | None = None,
    row_labels: Sequence[str] | None = None,
):
    """A grid of images in [-1, 1], optionally titled one by one, and each row labelled at its left.

    outline[k] = True draws a green frame around image k, False a red one, None none (e.g. valid / invalid).
    """
    rows = math.ceil(len(images) / columns)
    label_width = 0.07 * max(map(len, row_labels)) if row_labels else 0  # inches: the layout keeps the labels whole
    fig = _figure(columns * 1.1 + label_width, rows * 1.2 + (0.3 if title else 0))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(images):
            ax.axis("off")
            continue
        _show(ax, images[k], titles[k] if titles else None)
        if row_labels and k % columns == 0:
            ax.set_ylabel(row_labels[k // columns], rotation=0, ha="right", va="center", fontsize=8)
        if outline is not None and outline[k] is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if outline[k] else "red")
                spine.set_linewidth(2.5)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------
# 4. The forward process: a fixed noise schedule and q(x_t | x_0) in closed form
# ------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_t rising linearly from 1e-4 to 0.02, scaled for T != 1000 (Ho et al. 2020, arXiv 2006.11239)."""
    scale = 1000 / num_timesteps
    if beta_end * scale >= 1:
        needed = math.floor(beta_end * 1000) + 1
        raise ValueError(f"the linear schedule needs at least {needed} timesteps, got {num_timesteps}")
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 (arXiv 2102.09672), eq. (17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + offset) / (1 + offset)) * pi/2); then
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at 0.999 to avoid the singularity at t = T.
    """
    fraction = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((fraction + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


_DEVICE_TABLES_KEPT = 32  # NoiseSchedule.gather's cache: the schedule's own tables, a few loss weights


class NoiseSchedule:
    """The fixed forward process and every table derived from it, precomputed in float64.

    Index i = 0 .. len-1 runs from the least to the most noisy step; x_0 is the clean image. `timesteps[i]` is the
    time the network sees at index i: the training timestep for DDPM's schedules (the identity for the training
    schedule, the kept timesteps for a respaced one, `respaced`, which samples with fewer steps), (T - 1) t for the
    flow. Every table is in variance-preserving form, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps; a path
    with other scales, as the flow's, is that path times `input_scales[i]`, the factor its network input takes.
    """

    def __init__(
        self, betas: torch.Tensor, timesteps: torch.Tensor | None = None, input_scales: torch.Tensor | None = None
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.timesteps = torch.arange(len(betas)) if timesteps is None else timesteps
        self.input_scales = torch.ones(len(betas), dtype=torch.float64) if input_scales is None else input_scales
        self.alphas = 1 - betas  # alpha_t = 1 - beta_t
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # alpha_bar_t = prod_{s<=t} alpha_s
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.sqrt_alpha_bars = self.alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1 - self.alpha_bars).sqrt()
        self.snr = self.alpha_bars / (1 - self.alpha_bars)  # signal-to-noise ratio of x_t
        # The posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I), DDPM eq. (6)-(7)
        self.posterior_variance = betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)
        self.posterior_mean_coef1 = betas * self.alpha_bars_prev.sqrt() / (1 - self.alpha_bars)
        self.posterior_mean_coef2 = (1 - self.alpha_bars_prev) * self.alphas.sqrt() / (1 - self.alpha_bars)
        # (id(table), device, dtype) -> (table, its device copy); holding the table keeps its id from being reused
        self._device_tables: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: ModelConfig) -> NoiseSchedule:
        return cls.create(config.schedule, config.num_timesteps)

    @classmethod
    def create(cls, kind: str = "cosine", num_timesteps: int = 1000) -> NoiseSchedule:
        _check_choice("schedule", kind, SCHEDULES)
        _check_positive_int("num_timesteps", num_timesteps)
        if kind == "flow":
            return flow_schedule(num_timesteps)
        return cls(linear_betas(num_timesteps) if kind == "linear" else cosine_betas(num_timesteps))

    def __len__(self) -> int:
        return len(self.betas)

    def respaced(self, num_steps: int, spacing: str = "time") -> NoiseSchedule:
        """A shorter schedule over num_steps of these timesteps (section 7; "logsnr" spacing: section 10).

        It keeps alpha_bar at the kept steps, so beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} (Nichol &
        Dhariwal 2021, section 4): a model trained on T steps samples in fewer. "time" keeps num_steps timesteps
        evenly spaced from 0 to T-1.
        """
        _check_positive_int("num_steps", num_steps)
        if num_steps > len(self):
            raise ValueError(f"num_steps must be <= the {len(self)} training timesteps, got {num_steps}")
        _check_choice("spacing", spacing, SPACINGS)
        return self.at(SPACINGS[spacing](self, num_steps))

    def at(self, kept: torch.Tensor) -> NoiseSchedule:
        """The schedule restricted to the kept indices (increasing), with alpha_bar kept there."""
        kept = torch.as_tensor(kept, dtype=torch.long)
        if kept.ndim != 1 or len(kept) == 0 or bool((kept[1:] <= kept[:-1]).any()):
            raise ValueError(f"kept indices must be increasing, got {kept.tolist()}")
        kept_alpha_bars = self.alpha_bars[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_alpha_bars[:-1]])
        return NoiseSchedule(1 - kept_alpha_bars / previous, self.timesteps[kept], self.input_scales[kept])

    def check_t(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an integer tensor of timestep indices, got {t!r}")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= len(self)):
            low, high = int(t.min()), int(t.max())
            raise ValueError(f"timesteps must be in [0, {len(self) - 1}], got values in [{low}, {high}]")

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as a (N, 1, 1, 1) tensor on like's device and dtype, ready to broadcast.

        Each table is copied to the device once and cached, so the training loop does no host-to-device copy per
        step: as float32 (which MPS needs), or as float64 for float64 work such as the tests against diffusers.
        The cache holds the table itself beside its copy: a table made afresh for one call (a loss-weight table
        built in a loop) cannot then get the id of a freed one and be served the freed one's values. A few such
        tables are kept at most; past that the cache starts again.
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (id(values), like.device, dtype)
        cached = self._device_tables.get(key)
        if cached is None or cached[0] is not values:
            if len(self._device_tables) >= _DEVICE_TABLES_KEPT:
                self._device_tables.clear()
            cached = self._device_tables[key] = (values, values.to(like.device, dtype))
        return cached[1][t].to(like.dtype).view(-1, 1, 1, 1)

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1} for each image of a batch."""
        return torch.randint(0, len(self), (n,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form (DDPM eq. (4)), after checking the arguments."""
        self.check_t(t)
        if x0.shape != noise.shape or len(t) != len(x0):
            raise ValueError(f"x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and t ({len(t)}) must match")
        return self.noised(x0, noise, t)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """add_noise without the checks, which would cost a host-device sync in the training loop."""
        # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        return (
            self.gather(self.sqrt_alpha_bars, t, x0) * x0 + self.gather(self.sqrt_one_minus_alpha_bars, t, x0) * noise
        )

    # Prediction targets and the exact conversions between x_0, eps, v and the flow velocity u. With
    # alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) and alpha^2 + sigma^2 = 1:
    #   x_t = alpha x_0 + sigma eps,   v = alpha eps - sigma x_0,   u = eps - x_0,
    # so   x_0 = alpha x_t - sigma v = (x_t - sigma u) / (alpha + sigma)   and   eps = sigma x_t + alpha v.

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = alpha eps - sigma x_0 (Salimans & Ho 2022, arXiv 2202.00512, section 4)."""
        return (
            self.gather(self.sqrt_alpha_bars, t, x0) * noise - self.gather(self.sqrt_one_minus_alpha_bars, t, x0) * x0
        )

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps itself, v, x_0 itself, or the flow velocity eps - x_0."""
        _check_choice("prediction", prediction, PREDICTIONS)
        targets = {"eps": lambda: noise, "v": lambda: self.v_target(x0, noise, t), "x0": lambda: x0}
        return targets.get(prediction, lambda: noise - x0)()

    def predict_x0(self, prediction: str, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 from a network output: (x_t - sigma eps) / alpha for eps, alpha x_t - sigma v for v, the output itself
        for x0, (x_t - sigma u) / (alpha + sigma) for the velocity u."""
        if prediction == "x0":
            return output
        alpha = self.gather(self.sqrt_alpha_bars, t, x_t)
        sigma = self.gather(self.sqrt_one_minus_alpha_bars, t, x_t)
        if prediction == "eps":
            return (x_t - sigma * output) / alpha
        return alpha * x_t - sigma * output if prediction == "v" else (x_t - sigma * output) / (alpha + sigma)

    def loss_weights(self, prediction: str, min_snr_gamma: float | None, min_snr_form: str = "cap") -> torch.Tensor:
        """The loss weight w(t) of every timestep, a (T,) table computed once (min-SNR-gamma, arXiv 2303.09556).

        Each target's error is an x_0 error in disguise (predict_x0 inverts it):
            ||eps_hat - eps||^2 = SNR ||x0_hat - x_0||^2,   ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x_0||^2,
            ||u_hat - u||^2 = (1 + sqrt(SNR))^2 ||x0_hat - x_0||^2,
        so plain MSE already weights the x_0 error by lam = SNR (eps), SNR + 1 (v), 1 (x0) or (1 + sqrt(SNR))^2 (u).
        "cap":   w = min(lam, gamma) / lam, an x_0 weight of min(lam, gamma): plain MSE with its weight capped at
                 gamma, so the almost clean steps (lam huge, the task easy) stop dominating and the rest keep theirs.
        "paper": w = min(SNR, gamma) / lam, an x_0 weight of min(SNR, gamma) (Hang et al.'s formula). For v it
                 sends the noisiest steps, where the shape is chosen, to weight 0 (SNR -> 0).
        For eps the two are the same. gamma = None: plain MSE, w = 1.
        """
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("min_snr_form", min_snr_form, MIN_SNR_FORMS)
        if min_snr_gamma is None:
            return torch.ones(len(self), dtype=torch.float64)
        lam = x0_weight_of(prediction, self.snr)  # the x_0 weight plain MSE on this target gives
        clipped = (lam if min_snr_form == "cap" else self.snr).clamp(max=min_snr_gamma)
        return clipped / lam


def x0_weight_of(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """The weight plain MSE on a target puts on the x_0 error, at each signal-to-noise ratio (loss_weights)."""
    _check_choice("prediction", prediction, PREDICTIONS)
    weights = {"eps": lambda: snr, "v": lambda: snr + 1, "x0": lambda: torch.ones_like(snr)}
    return weights.get(prediction, lambda: (1 + snr.sqrt()) ** 2)()


# Rectified flow (Liu et al. 2022, arXiv 2209.03003; the objective of Stable Diffusion 3, Esser et al. 2024, arXiv
# 2403.03206) joins data and noise by a straight line, x_t = (1 - t) x_0 + t eps for t in [0, 1], and learns its
# velocity u = dx_t/dt = eps - x_0. It is a Gaussian path like DDPM's, with other scales alpha_t = 1 - t and
# sigma_t = t: divided by c_t = sqrt((1 - t)^2 + t^2) it is the variance-preserving path of alpha_bar =
# (1 - t)^2 / c_t^2 (Kingma & Gao 2023, arXiv 2303.00848). So the flow is one more NoiseSchedule: its network
# input is c_t times the variance-preserving x, its time (T - 1) t, and every sampler of sections 7 and 10 runs it.


def flow_schedule(num_timesteps: int = 1000) -> NoiseSchedule:
    """Rectified flow on the grid t_i = (i + 1) / (T + 1), i = 0 .. T-1, in variance-preserving form.

    The grid stops short of t = 0 and t = 1, where the log-SNR is infinite; its ends, SNR 1e6 and 1e-6, lie beyond
    what a shape needs (the cosine schedule spans 2e4 to 2e-9).
    """
    _check_positive_int("num_timesteps", num_timesteps)
    t = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / (num_timesteps + 1)
    scale = ((1 - t) ** 2 + t**2).sqrt()  # c_t
    alpha_bars = ((1 - t) / scale) ** 2
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    return NoiseSchedule(1 - alpha_bars / previous, timesteps=(num_timesteps - 1) * t, input_scales=scale)


def _time_spacing(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
    """num_steps indices evenly spaced in time from 0 to T-1; one step must start where sampling does, at T-1."""
    if num_steps == 1:
        return torch.tensor([len(schedule) - 1])
    return torch.linspace(0, len(schedule) - 1, num_steps, dtype=torch.float64).round().long()


def _log_snr_spacing(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
    """num_steps indices whose log-SNR is evenly spaced from that of T-1 to that of 0 (the "logSNR" grid of
    DPM-Solver, Lu et al. 2022, arXiv 2206.00927, section 3.4): equal steps in lambda = log(alpha / sigma), the
    variable in which the probability-flow ODE's solution is an exponential integral (section 10)."""
    if num_steps == 1:
        return torch.tensor([len(schedule) - 1])
    lam = 0.5 * schedule.snr.log()  # lambda_t, falling with t
    targets = torch.linspace(float(lam[0]), float(lam[-1]), num_steps, dtype=torch.float64)
    kept = (lam[None, :] - targets[:, None]).abs().argmin(1)  # the nearest timestep to each target, increasing
    kept[-1] = len(schedule) - 1
    for k in range(num_steps - 2, -1, -1):  # distinct indices: push collisions towards less noise
        kept[k] = min(int(kept[k]), int(kept[k + 1]) - 1)
    if int(kept[0]) < 0:  # more steps than the fast-changing lambda near t = 0 has timesteps: push them up instead
        kept[0] = 0
        for k in range(1, num_steps):
            kept[k] = max(int(kept[k]), int(kept[k - 1]) + 1)
        kept = torch.minimum(kept, torch.arange(len(schedule) - num_steps, len(schedule)))
    return kept


def _trailing(spacing: Callable[[NoiseSchedule, int], torch.Tensor]) -> Callable[[NoiseSchedule, int], torch.Tensor]:
    """The grid of num_steps + 1 points without its cleanest: every one of few steps then does work.

    The plain grids always keep index 0, nearly clean already, so their last step is all but wasted; at 2 steps the
    first one jumps from pure noise to index 0 (Lin et al. 2024, arXiv 2305.08891, section 3.3, "trailing").
    """

    def trailing(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
        return spacing(schedule, num_steps) if num_steps >= len(schedule) else spacing(schedule, num_steps + 1)[1:]

    return trailing


SPACINGS: dict[str, Callable[[NoiseSchedule, int], torch.Tensor]] = {
    "time": _time_spacing,
    "logsnr": _log_snr_spacing,
    "time-trailing": _trailing(_time_spacing),
    "logsnr-trailing": _trailing(_log_snr_spacing),
}


def plot_forward_process(
    schedule: NoiseSchedule, x0: torch.Tensor, ts: Sequence[int] = (0, 50, 100, 200, 400, 600, 800, 999), seed: int = 0
):
    """One image (1, 1, 64, 64) noised to each t in ts with q(x_t | x_0), one shared noise draw."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    fig = _figure(len(ts) * 1.2 + 1.2, 1.6)
    axes = fig.subplots(1, len(ts) + 1)
    _show(axes[0], x0[0], "x_0")
    for ax, t in zip(axes[1:], ts):
        x_t = schedule.add_noise(x0, noise, torch.tensor([t]))
        _show(ax, x_t[0].clamp(-1, 1), f"t={t}\nᾱ={float(schedule.alpha_bars[t]):.3f}")
    return fig


def plot_schedules(num_timesteps: int = 1000):
    """alpha_bar_t and log SNR for each schedule (the flow's in variance-preserving form, section 4)."""
    fig = _figure(9, 3)
    left, right = fig.subplots(1, 2)
    for kind in SCHEDULES:
        schedule = NoiseSchedule.create(kind, num_timesteps)
        left.plot(schedule.alpha_bars.numpy(), label=kind)
        right.plot(schedule.snr.log10().numpy(), label=kind)
    left.set_title("signal kept: ᾱ_t")
    right.set_title("log10 SNR = log10(ᾱ_t / (1 - ᾱ_t))")
    for ax in (left, right):
        ax.set_xlabel("t")
        ax.legend()
    return fig


# ------------------------------------------------------------------------------------------
# 5. The U-Net: predicts eps (or v) from x_t, the timestep and, optionally, a request or a prompt
# ------------------------------------------------------------------------------------------


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style features [cos(x w_k), sin(x w_k)] with w_k = max_period^(-k / (dim/2)), k < dim/2.

    Vaswani et al. 2017 (arXiv 1706.03762), section 3.5; DDPM embeds its timestep this way (appendix B). The low
    frequencies change slowly with x and say roughly where it is, the high ones tell neighbours apart.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


ATTRIBUTE_PERIOD = 64.0  # pixels: the slowest attribute feature turns once in 2 pi * 64 px, the frame's size and more


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _upsampler(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1))


def _mlp(features: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))


class ConditionEmbedding(nn.Module):
    """A request (every field of REQUEST_FIELDS) as one vector that the U-Net adds to its time embedding.

    A categorical field (the class) has a learned embedding with one more row for "not given" (as diffusers'
    `class_embed`); a numeric field (centre, size) goes through sinusoidal features of each of its numbers and a small
    MLP, and "not given" is a learned vector. The fields' vectors are summed. Everything starts at zero, so an
    untrained conditional U-Net is the unconditional one.
    """

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        self.features = features
        for f in REQUEST_FIELDS:  # each layer is named by its field (RequestField.module): the checkpoint's keys
            if f.categories is not None:
                layer = nn.Embedding(len(f.categories()) + 1, dim)  # the last row: not given
                nn.init.zeros_(layer.weight)
            else:
                layer = _mlp(f.width * features, dim)
                nn.init.zeros_(layer[-1].weight)
                nn.init.zeros_(layer[-1].bias)
                self.register_parameter(f"null_{f.module}", nn.Parameter(torch.zeros(dim)))
            self.add_module(f.module, layer)

    def forward(self, condition: Condition) -> torch.Tensor:
        given = condition.given()
        vectors = []
        for f in REQUEST_FIELDS:
            values, layer = condition.values[f.name], getattr(self, f.module)
            if f.categories is not None:
                vectors.append(layer(torch.where(given[f.name], values, len(f.categories()))))
                continue
            numbers = values.nan_to_num(0.0).reshape(len(values), f.width)
            features = torch.cat([self._features(numbers[:, k]) for k in range(f.width)], 1)
            vectors.append(torch.where(given[f.name][:, None], layer(features), getattr(self, f"null_{f.module}")))
        return sum(vectors[1:], vectors[0])

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(pixels, self.features, max_period=ATTRIBUTE_PERIOD)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time), GroupNorm -> SiLU -> conv, plus a skip connection.

    If time_dim is set, a linear projection of the time embedding is added to every channel after the first conv:
    the block's features then depend on how noisy the input is (and on the request, which rides along).
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip connection: stable early training
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

    softmax(Q K^T / sqrt(d)) V lets every position see every other one in a single layer: cheap at the small
    bottleneck, and it helps the network agree on one shape for the whole image.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)  # starts as the identity, like the residual blocks
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # (n, heads, h*w, c/heads)
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))


@functools.lru_cache(maxsize=8)  # the same few tables at every step, made once on their device
def rotary_tables(
    length: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, dim) of RoPE's angles m * theta_i, theta_i = ROTARY_BASE^(-2i / dim), for positions
    m = 0..length-1, each angle twice (for x_i and x_{i + dim/2}, the pairs `rotate` turns together)."""
    theta = ROTARY_BASE ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * theta
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoPE; Su et al. 2021, arXiv 2104.09864, eq. 34): the pair (x_i, x_{i + d/2}) of
    the vector at position m is turned by the angle m * theta_i. Turned queries and keys give
    q_m . k_n = Re[sum_i q_i conj(k_i) e^{i (m - n) theta_i}]: the attention score depends on the positions only
    through their difference, so a word pattern means the same wherever it sits in the prompt."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class TextLayer(nn.Module):
    """A pre-norm transformer encoder layer (Vaswani et al. 2017, arXiv 1706.03762; norm first, as GPT-2) whose
    self-attention turns queries and keys by their token's position (`rotate`), as LLaMA's does."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n, length, width = h.shape
        q, k, v = self.qkv(self.attention_norm(h)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(length, q.shape[-1], q.device, q.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=present[:, None, None, :])
        h = h + self.out(attended.transpose(1, 2).reshape(n, length, width))
        return h + self.mlp(self.mlp_norm(h))


class TextEncoder(nn.Module):
    """A prompt's tokens as vectors that know their neighbours: a token embedding and a few pre-norm transformer
    layers (Vaswani et al. 2017, arXiv 1706.03762), trained with the U-Net from scratch, as a small stand-in for
    Stable Diffusion's frozen CLIP text encoder (Rombach et al. 2022, arXiv 2112.10752).

    Why this size: the language has under 100 tokens and prompts of at most 16; what a word means depends only on a
    few neighbours ("top" before "left" is a quadrant, a number before "px" is a size, after "at" a place). One layer
    lets each token see its neighbours and a second composes "at X , Y"; 64 wide is ~80 k parameters, a quarter of
    the CPU U-Net's (the number of heads only splits the width). A number token also gets sinusoidal features of
    its value, so "25" lies between "24" and "26" from the start. A learned start vector leads every prompt: the
    empty prompt is that vector alone, and attention always has a key.

    Word order: with positions "rotary" (the default), the layers' attention turns queries and keys by their
    positions (RoPE, `rotate`), so a pattern like "at X , Y" or "N px" reads the same at any place in the prompt;
    "learned" adds a learned vector per position to each token instead (GPT-2's way), which ties a word's vector to
    the places training put it. Over two seeds at 15 minutes, in phrasings never seen in training, learned positions
    put an exact place 1.8-2.3 px off and obeyed the size words 87-90 %; rotary ones (four heads) 0.5-0.7 px and
    99-100 %, as in the seen phrasings (RESULTS.md, "Prompts"). The learned positions start at the token embeddings'
    scale (N(0, 1)), not GPT-2's 0.02: started at 0.02, trained models gave "20" the same vector as x and as y
    (number_role_share 0.02-0.04).
    """

    def __init__(self, width: int, layers: int, positions: str, heads: int) -> None:
        super().__init__()
        _check_choice("positions", positions, TEXT_POSITIONS)
        self.width = width
        self.tokens = nn.Embedding(len(VOCABULARY), width, padding_idx=0)
        self.numbers = nn.Linear(width, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(PROMPT_LENGTH + 1, width))
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(layers)
            )
        else:
            self.positions = None
            self.layers = nn.ModuleList(TextLayer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1 + PROMPT_LENGTH, width) token vectors, the start vector first, and the (N, 1 + PROMPT_LENGTH) bool
        mask of those that are there (not padding)."""
        ids = prompt.tokens
        n = len(ids)
        values = (ids - FIRST_NUMBER_ID).clamp(0, IMAGE_SIZE - 1).flatten()
        is_number = ((ids >= FIRST_NUMBER_ID) & (ids < FIRST_NUMBER_ID + IMAGE_SIZE))[..., None]
        number_features = sinusoidal_embedding(values, self.width, max_period=ATTRIBUTE_PERIOD).view(n, -1, self.width)
        words = self.tokens(ids) + is_number * self.numbers(number_features)
        h = torch.cat([self.start.expand(n, 1, self.width), words], 1)
        present = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=ids.device), ids != 0], 1)
        if self.positions is not None:
            h = h + self.positions
            for layer in self.layers:
                h = layer(h, src_key_padding_mask=~present)
        else:
            for layer in self.layers:
                h = layer(h, present)
        return self.norm(h), present


def number_role_share(encoder: TextEncoder) -> float:
    """Does a text encoder tell a number's role from its place in the prompt? How far "20" as x ("circle at 20, 44")
    lies from "20" as y ("circle at 44, 20"), as a share of how far it lies from "44": 0 when x and y are one to it."""
    device = encoder.start.device
    with torch.no_grad():
        states, _ = encoder(Prompt.of(["circle at 20, 44", "circle at 44, 20"]).to(device))
    as_x, as_y, other = states[0, 3], states[1, 5], states[0, 5]  # the start vector, "circle", "at", "20", ",", "44"
    return float((as_x - as_y).norm() / (as_x - other).norm())


@functools.lru_cache(maxsize=8)  # the same few maps at every step: computed once each, on their device
def pixel_positions(
    channels: int, height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(1, channels, height, width): each pixel's centre in frame pixels, x in the first half of the channels and y
    in the second, as sinusoidal features (Vaswani et al. 2017; 2-D as in Carion et al. 2020, arXiv 2005.12872)."""
    scale = IMAGE_SIZE / width  # a feature-map pixel covers scale x scale frame pixels
    centres = (torch.arange(width) + 0.5) * scale - 0.5
    x = sinusoidal_embedding(centres, channels // 2, max_period=ATTRIBUTE_PERIOD)  # (width, channels / 2)
    y = sinusoidal_embedding((torch.arange(height) + 0.5) * scale - 0.5, channels // 2, max_period=ATTRIBUTE_PERIOD)
    grid = torch.cat([x.T[:, None, :].expand(-1, height, -1), y.T[:, :, None].expand(-1, -1, width)])
    return grid[None].to(device, dtype)


class CrossAttention(nn.Module):
    """Every pixel looks at every word: queries from the feature map, keys and values from the prompt's token
    vectors, softmax(Q K^T / sqrt(d)) V over the tokens that are there, with a residual connection (Rombach et al.
    2022, section 3.3). It starts as the identity (zero output projection), like the other blocks.

    With positions, each query also carries its pixel's place (pixel_positions, through its own projection): a
    convolution's features say what is at a pixel, and only faintly where it is, so without them a word like "left"
    has no query to match but the shape's own pixels."""

    def __init__(self, channels: int, text_width: int, heads: int, positions: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.positions = nn.Conv2d(channels, channels, 1, bias=False) if positions else None
        self.norm = _group_norm(channels)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key_value = nn.Linear(text_width, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self._projections(x, text)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=present[:, None, None, :])
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))

    def weights(self, x: torch.Tensor, text: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(N, heads, H*W, tokens): how much each pixel attends to each token (rows sum to 1), written out."""
        q, k, _ = self._projections(x, text)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return scores.masked_fill(~present[:, None, None, :], -math.inf).softmax(-1)

    def _projections(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q (N, heads, H*W, d) from the pixels; K and V (N, heads, tokens, d) from the token vectors."""
        n, c, h, w = x.shape
        q = self.query(self.norm(x))
        if self.positions is not None:
            q = q + self.positions(pixel_positions(c, h, w, x.device, x.dtype))
        q = q.reshape(n, self.heads, c // self.heads, h * w).transpose(-1, -2)
        k, v = self.key_value(text).view(n, text.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v


class UNet(nn.Module):
    """Encoder-decoder with skip connections that predicts eps (or v) from (x_t, t) and, optionally, a request or a
    prompt.

    Encoder: each level runs residual blocks, keeps its output for the decoder (the skip), then halves the
    resolution with a strided conv. Bottleneck: two residual blocks, with self-attention between them. Decoder: the
    mirror image, concatenating each level's skip before its blocks and doubling the resolution with nearest-neighbour
    upsampling + conv. The timestep goes through a sinusoidal embedding and a small MLP, then is added in every
    residual block or only at the bottleneck (the original design). A conditional U-Net adds the request's embedding
    to it; one that reads prompts (ModelConfig.conditioning "prompt") adds the mean of the prompt's token vectors
    (TextEncoder) through a small MLP instead, as SDXL and SD3 add their pooled text vector (Podell et al. 2023, arXiv
    2307.01952; Esser et al. 2024, arXiv 2403.03206), and reads the words with cross-attention (CrossAttention)
    after the bottleneck's self-attention and after each decoder level's blocks (the coarsest
    `cross_attention_levels` of them: fewer is cheaper on a CPU): every pixel looks at every word, on maps coarse
    enough for it to be cheap and fine enough to place a shape. A pixel-unshuffle stem folds 2x2 (or 4x4) pixels
    into channels, so the network runs at 32x32 (16x16), 4x (16x) cheaper, and a pixel-shuffle head undoes it.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        widths = [config.base_channels * m for m in config.channel_mults]
        time_dim = config.base_channels * 4
        block_time = time_dim if config.time_injection == "every_block" else None
        factor, heads = config.pixel_unshuffle, config.attention_heads
        self.time_mlp = _mlp(config.base_channels, time_dim)
        reads_prompts = config.conditional and config.conditioning == "prompt"
        reads_requests = config.conditional and not reads_prompts
        self.condition_embedding = ConditionEmbedding(config.base_channels, time_dim) if reads_requests else None
        self.text_encoder = (
            TextEncoder(config.text_width, config.text_layers, config.text_positions, heads) if reads_prompts else None
        )
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
        self.mid_attention = SelfAttention(channels, heads) if config.bottleneck_attention else nn.Identity()

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = []
            for b in range(config.blocks_per_level):
                skip = width if b == 0 else 0  # the level's skip joins before its first block
                blocks.append(ResidualBlock(channels + skip, width, block_time, config.dropout))
                channels = width
            self.up_blocks.append(nn.ModuleList(blocks))
            self.upsamplers.append(nn.Identity() if level == 0 else _upsampler(width, widths[level - 1]))
            channels = width if level == 0 else widths[level - 1]

        if reads_prompts:  # the prompt's mean vector joins the time embedding; cross-attention reads its words
            # (an MLP, not one linear layer: over two seeds, guidance 3, halves 93-97 % obeyed against 62-97 %)
            self.prompt_pool = _mlp(config.text_width, time_dim)
            nn.init.zeros_(self.prompt_pool[-1].weight)
            nn.init.zeros_(self.prompt_pool[-1].bias)
            self.mid_cross = CrossAttention(widths[-1], config.text_width, heads, config.query_positions)
            reading = len(widths) if config.cross_attention_levels is None else config.cross_attention_levels
            self.up_cross = nn.ModuleList(
                CrossAttention(width, config.text_width, heads, config.query_positions)
                if k < reading
                else nn.Identity()
                for k, width in enumerate(reversed(widths))
            )

        head_conv = nn.Conv2d(channels, factor * factor, 3, padding=1)
        self.head = nn.Sequential(_group_norm(channels), nn.SiLU(), head_conv, nn.PixelShuffle(factor))

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Condition | Prompt | None = None) -> torch.Tensor:
        """The prediction for x_t at training timesteps t; condition None = unconditional (all fields null, or the
        empty prompt)."""
        time = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))
        text = None
        self._check_condition(condition)
        if self.text_encoder is not None:
            text = self.text_encoder(condition if condition is not None else Prompt.null(len(x), x.device))
            states, present = text
            pooled = (states * present[..., None]).sum(1) / present.sum(1, keepdim=True)
            time = time + self.prompt_pool(pooled)
        elif self.condition_embedding is not None:
            time = time + self.condition_embedding(
                condition if condition is not None else Condition.null(len(x), x.device)
            )
        h = self.stem(x)
        skips = []
        for blocks, downsample in zip(self.down_blocks, self.downsamplers):
            for block in blocks:
                h = block(h, time)
            skips.append(h)
            h = downsample(h)
        h = self.mid_blocks[0](h, time)
        h = self.mid_attention(h)
        if text is not None:
            h = self.mid_cross(h, *text)
        h = self.mid_blocks[1](h, time)
        for level, (blocks, upsample) in enumerate(zip(self.up_blocks, self.upsamplers)):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, time)
            if text is not None and isinstance(self.up_cross[level], CrossAttention):
                h = self.up_cross[level](h, *text)
            h = upsample(h)
        return self.head(h)

    def _check_condition(self, condition: Condition | Prompt | None) -> None:
        """A request to a request model, a prompt to a prompt model; to an unconditional one, nothing but null."""
        if condition is None:
            return
        reads = self.config.conditioning if self.config.conditional else None
        kind = "prompt" if isinstance(condition, Prompt) else "request"
        if reads is None and bool(torch.cat(list(condition.given().values())).any()):
            raise ValueError(f"this U-Net is unconditional (ModelConfig.conditional=False): it cannot take a {kind}")
        if reads is not None and kind != reads:
            raise ValueError(f"this U-Net reads a {reads} (ModelConfig.conditioning={reads!r}), not a {kind}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: UNet) -> str:
    """Parameter count and the feature-map shape at each level, for a one-line summary."""
    c = model.config
    size = IMAGE_SIZE // c.pixel_unshuffle
    levels = " -> ".join(f"{c.base_channels * m}x{size >> i}x{size >> i}" for i, m in enumerate(c.channel_mults))
    kind = ("prompt-conditional " if c.conditioning == "prompt" else "conditional ") if c.conditional else ""
    return (
        f"{kind}U-Net, {count_parameters(model) / 1e6:.2f} M parameters; levels (channels x H x W): {levels}; "
        f"time enters {c.time_injection.replace('_', ' ')}"
    )


@torch.no_grad()
def feature_shapes(model: UNet) -> list[tuple[str, tuple[int, ...]]]:
    """(stage, (channels, H, W)) of the feature maps in one forward pass of a 64x64 image.

    Forward hooks record the stem output, each encoder level (its skip), the bottleneck, each decoder level (before
    upsampling) and the head; the model's weights and mode are untouched.
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
        x = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device=parameter.device, dtype=parameter.dtype)
        model.eval()(x, torch.zeros(1, dtype=torch.long, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return shapes


@torch.no_grad()
def cross_attention_maps(model: UNet, x: torch.Tensor, t: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """(N, 1 + PROMPT_LENGTH, 64, 64): for each token of each prompt (the start vector first, then
    `prompt_token_names`), the share of attention each pixel gives it, averaged over heads and over every
    cross-attention layer, each map upsampled to the frame: which pixels read `left`, `circle`, `small` (Hertz et
    al. 2022, "Prompt-to-Prompt", arXiv 2208.01626). Padding tokens get zero."""
    layers = [module for module in model.modules() if isinstance(module, CrossAttention)]
    if not layers:
        raise ValueError("this model has no cross-attention: train it with ModelConfig(conditioning='prompt')")
    maps = []

    def record(module: CrossAttention, inputs: tuple, output: torch.Tensor) -> None:
        h, w = inputs[0].shape[-2:]
        weights = module.weights(*inputs).float().mean(1)  # (N, H*W, tokens), heads averaged
        image = weights.transpose(1, 2).reshape(len(weights), -1, h, w)
        maps.append(F.interpolate(image, size=(IMAGE_SIZE, IMAGE_SIZE), mode="nearest"))

    handles = [layer.register_forward_hook(record) for layer in layers]
    was_training = model.training
    try:
        model.eval()(x, t, prompt)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack(maps).mean(0)


def plot_time_embedding(dim: int = 32, num_timesteps: int = 1000):
    """The sinusoidal features of every timestep as a heat map: the cos half above the sin half.

    Drawn as an image of num_timesteps columns resampled by matplotlib with antialiasing, so the fast features do
    not alias into moire patterns on screen.
    """
    fig = _figure(7, 3.2)
    ax = fig.subplots()
    features = sinusoidal_embedding(torch.arange(num_timesteps), dim).T.numpy()
    image = ax.imshow(
        features,
        aspect="auto",
        cmap="RdBu",
        interpolation="antialiased",
        vmin=-1,
        vmax=1,
        extent=(-0.5, num_timesteps - 0.5, dim - 0.5, -0.5),
    )
    ax.axhline(dim / 2 - 0.5, color="black", lw=0.8)
    half = dim // 2
    ax.set_yticks([0, half - 1, half, dim - 1], ["cos k=0", f"cos k={half - 1}", "sin k=0", f"sin k={half - 1}"])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("feature (frequency k)")
    ax.set_title("Sinusoidal time embedding: cos(t ω_k) above, sin(t ω_k) below; ω_k falls with k")
    fig.colorbar(image, ax=ax)
    return fig


# ------------------------------------------------------------------------------------------
# 6. Training: a weighted MSE between the network output and its target (eps or v)
# ------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last saved checkpoint is untouched."""


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    prediction: str,
    loss_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    condition: Condition | None = None,
    time_sampling: str = "uniform",
) -> torch.Tensor:
    """One Monte-Carlo estimate of the training objective, DDPM's L_simple (Ho et al. 2020, eq. (14)), reweighted.

        t ~ U{0..T-1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
        loss = mean_i  w(t_i) || model(x_t, t_i) - target_i ||^2,   target = eps or v.
    loss_weights is the (T,) table w of NoiseSchedule.loss_weights (None: w = 1); condition is the request each x_0
    answers, for a conditional model (None: unconditional); time_sampling draws t otherwise than uniformly
    (training_timesteps), e.g. "shifted" towards the noise for a model that reads prompts.
    """
    t = training_timesteps(schedule, len(x0), time_sampling, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.noised(x0, noise, t)
    target = schedule.target(prediction, x0, noise, t)
    output = model(x_t, t) if condition is None else model(x_t, t, condition)
    per_image = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if loss_weights is None:
        return per_image.mean()
    return (schedule.gather(loss_weights, t, per_image).flatten() * per_image).mean()


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    time_sampling: str = "logit-normal",
    generator: torch.Generator | None = None,
    condition: Condition | None = None,
    num_timesteps: int = 1000,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The other side of the coin: rectified flow's objective (Liu et al. 2022; Esser et al. 2024, eq. (1)-(3)).

        t ~ p(t),  eps ~ N(0, I),  x_t = (1 - t) x_0 + t eps,  loss = mean || model(x_t, (T - 1) t) - (eps - x_0) ||^2
    Plain MSE on the velocity, at continuous times t drawn uniformly or logit-normally (training_times); the network
    sees the time as (T - 1) t, the range of DDPM's timesteps, so one U-Net serves both objectives. `noise` pairs
    each x_0 with a given eps instead of a fresh draw (reflow, section 13).
    """
    t = training_times(len(x0), time_sampling, generator, x0.device).view(-1, 1, 1, 1)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = (1 - t) * x0 + t * noise
    time = (num_timesteps - 1) * t.flatten()
    output = model(x_t, time) if condition is None else model(x_t, time, condition)
    return F.mse_loss(output.float(), (noise - x0).float())


def training_times(
    n: int, sampling: str, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """n times in (0, 1): uniform; logit-normal, t = sigmoid(m) with m ~ N(0, 1), which trains the middle times
    (where the velocity is hardest to guess) most (Esser et al. 2024, section 3.1, eq. (19)); or shifted, uniform
    times moved towards the noise by TIME_SHIFT (their eq. (23)), where a sample's layout is decided."""
    _check_choice("time_sampling", sampling, TIME_SAMPLINGS)
    if sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    u = torch.rand(n, generator=generator, device=device)
    # t = s u / (1 + (s - 1) u): the median time 0.5 becomes s / (s + 1)
    return u if sampling == "uniform" else TIME_SHIFT * u / (1 + (TIME_SHIFT - 1) * u)


def training_timesteps(
    schedule: NoiseSchedule,
    n: int,
    sampling: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """DDPM's training timesteps: uniform over {0, ..., T-1} (NoiseSchedule.sample_timesteps), or for another of
    TIME_SAMPLINGS the timestep floor(T u) of the continuous time u that training_times draws, its share of the way
    from the data to the noise."""
    if sampling == "uniform":
        return schedule.sample_timesteps(n, generator, device)
    return (training_times(n, sampling, generator, device) * len(schedule)).long().clamp_(max=len(schedule) - 1)


class EMA:
    """Exponential moving average of the weights, with warm-up: decay_k = min(decay, (1+k)/(10+k)).

    Averaging smooths out the jitter of the last optimiser steps; the warm-up lets a short run forget the random
    initial weights quickly. Sample from the EMA.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # ema = decay * ema + (1 - decay) * param for every tensor, in one fused call
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        self.updates += 1


@dataclass
class TrainingPlan:
    """A run's budget, fixed when the run starts and saved in its checkpoints: `steps` optimiser steps from
    `first_step`, and/or `seconds` of training (both: it ends at whichever comes first).

    The learning rate decays over the plan, so the plan must outlive an interruption. For a step budget the share
    done, and so the learning rate, follows from the step alone: a run killed and resumed retraces the uninterrupted
    one bit for bit. A minutes budget is a budget of training seconds: `seconds_spent` counts those done up to the
    last checkpoint, and a resumed run trains for the seconds left, its clock starting where that count stopped
    (the steps between the last checkpoint and an interruption are redone, and their time is not counted twice).
    """

    first_step: int
    steps: int | None = None
    seconds: float | None = None
    seconds_spent: float = 0.0

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("give a training budget: steps or minutes")
        if self.steps is not None:
            _check_positive_int("steps", self.steps)
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")

    @classmethod
    def of(cls, first_step: int, steps: int | None = None, minutes: float | None = None) -> TrainingPlan:
        """The plan of a budget in steps and/or minutes, from first_step on."""
        if minutes is not None and not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        return cls(first_step, steps, minutes * 60 if minutes is not None else None)

    def progress(self, step: int, seconds: float = 0.0) -> float:
        """The share of the plan done at `step`, `seconds` into the current train() call: the larger share."""
        shares = [0.0]
        if self.steps is not None:
            shares.append((step - self.first_step) / self.steps)
        if self.seconds is not None:
            shares.append((self.seconds_spent + seconds) / self.seconds)
        return max(shares)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """The learning rate of optimiser step `step` (0, 1, ...) with `progress` of the plan done before it.

        lr = peak * min(1, (step + 1) / (warmup + 1)) * 0.5 (1 + cos(pi * progress))   ("cosine"; "constant": no cos)
    The cosine decays to 0 at the end of the plan (Loshchilov & Hutter 2016, arXiv 1608.03983, without restarts):
    the budget is known in advance, so the last steps take small, careful ones.
    """
    warmup = min(1.0, (step + 1) / (config.warmup_steps + 1))
    if config.lr_schedule == "constant":
        return config.lr * warmup
    return config.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Owns the model, its EMA, the optimiser, the RNG and the plan; `train` runs a step or time budget."""

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        device: torch.device | str | None = None,
        data: torch.Tensor | ShapeBatch | None = None,
        precision: str | None = None,
    ) -> None:
        self.runtime = setup(device, precision)
        default_model, default_train = default_configs(self.runtime.device)
        self.model_config = model_config or default_model
        self.train_config = cfg = train_config or default_train
        if self.model_config.conditional and data is not None and not isinstance(data, ShapeBatch):
            raise ValueError("a conditional model learns what each image shows: pass data as a ShapeBatch, not images")
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is untouched
            torch.manual_seed(cfg.seed)
            self.model = UNet(self.model_config).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule.from_config(self.model_config)
        _check_objective(self.model_config, cfg)
        weights = self.schedule.loss_weights(self.model_config.prediction, cfg.min_snr_gamma, cfg.min_snr_form)
        self.loss_weights = weights.to(self.device, torch.float32)  # on the device once, like a registered buffer
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.train_model = torch.compile(self.model) if cfg.compile_model else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.runtime.fused_adamw
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.data = data
        self.plan: TrainingPlan | None = None
        self.step = 0
        self.images_seen = 0
        self.losses: list[float] = []
        self._batch_iterator: Iterator | None = None  # kept between train() calls
        self._batch_iterator_step = -1  # the step whose batch the iterator yields next
        self._call_started: float | None = None  # time.monotonic() when the running train() call began

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def sampling_model(self) -> nn.Module:
        """The EMA weights when there are any (they give cleaner samples), else the raw model."""
        return self.ema.model if self.ema is not None else self.model

    def progress(self) -> float:
        """The share of the plan done now (0 before any plan)."""
        if self.plan is None:
            return 0.0
        return self.plan.progress(self.step, self._seconds_in_call())

    def batches(self) -> Iterator[tuple[torch.Tensor, Condition | None]]:
        """Training batches from the current step on (the same ones whenever they are asked for)."""
        cfg, reads = self.train_config, self.model_config.conditioning
        if self.data is None:
            pin = self.device.type == "cuda"
            return training_batches(
                cfg.batch_size, cfg.seed, self.step, cfg.data_workers, pin, reads, cfg.condition_dropout
            )
        return fixed_batches(self.data, cfg.batch_size, cfg.seed, self.step, reads, cfg.condition_dropout)

    def train_step(self, x0: torch.Tensor, condition: Condition | Prompt | None = None) -> torch.Tensor:
        """One step of DDPM's training loop (Ho et al. 2020, Algorithm 1): a gradient step on the weighted loss of
        a batch of clean images x0 (diffusion_loss draws t and eps). Returns the loss, still on the device."""
        x0, condition = self._to_device(x0, condition)
        self.model.train()
        with self.runtime.autocast():
            loss = self.objective_loss(x0, condition)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler only scales in fp16 (section B)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.images_seen += len(x0)
        return loss.detach()

    def objective_loss(self, x0: torch.Tensor, condition: Condition | Prompt | None) -> torch.Tensor:
        """The loss of one batch on the device: DDPM's weighted MSE, or the flow's. A subclass that trains towards
        another target (section 13 distils a trained model) replaces this alone; the optimiser step stays."""
        config = self.model_config
        if config.schedule == "flow":  # rectified flow, the other side of the coin
            sampling, steps = self.train_config.time_sampling, len(self.schedule)
            return flow_matching_loss(self.train_model, x0, sampling, self.generator, condition, steps)
        weights, sampling = self.loss_weights, self.train_config.time_sampling
        return diffusion_loss(
            self.train_model, self.schedule, x0, config.prediction, weights, self.generator, condition, sampling
        )

    def _to_device(
        self, x0: torch.Tensor, condition: Condition | Prompt | None
    ) -> tuple[torch.Tensor, Condition | Prompt | None]:
        """The batch on the device, in the memory layout of the model, with the request's fields hidden at random
        (condition dropout, section 11; a caption left its parts out when it was written); None for an
        unconditional model."""
        x0 = x0.to(self.device, non_blocking=True)
        if self.train_config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if not self.model_config.conditional:
            return x0, None
        if condition is None:
            raise ValueError("a conditional model needs the condition of every training image")
        condition = condition.to(self.device, non_blocking=True)
        return x0, condition.dropped(self.train_config.condition_dropout, self.generator)

    def train(
        self,
        steps: int | None = None,
        minutes: float | None = None,
        progress: bool = True,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 500,
        on_log: Callable[[Trainer], None] | None = None,
    ) -> list[float]:
        """Train for `steps` more steps or `minutes` of wall time (both: the first reached), a new plan; with
        neither, go on with the current plan (e.g. a resumed checkpoint's) to its end.

        The loss is read back every `log_every` steps; a NaN/inf loss stops training with NonFiniteLossError naming
        the step, before anything is saved. With checkpoint_path, a checkpoint is written atomically every
        `checkpoint_every` steps and at the end. Returns the loss history (one value per step, all steps so far).
        """
        _check_positive_int("checkpoint_every", checkpoint_every)
        self.plan = self._next_plan(steps, minutes)
        bar = self._progress_bar(progress)
        pending: list[torch.Tensor] = []
        saved_at = None
        batches = self._batches_from_here()
        self._call_started = time.monotonic()
        try:
            with self.runtime.compute():
                while self.progress() < 1.0:
                    self._set_learning_rate()
                    self._batch_iterator_step = -1  # out of step until this batch is trained on
                    pending.append(self.train_step(*next(batches)))
                    self._batch_iterator_step = self.step
                    save_now = checkpoint_path is not None and self.step % checkpoint_every == 0
                    if len(pending) >= self.train_config.log_every or save_now or self.progress() >= 1.0:
                        self._log(pending, bar, on_log)
                        pending = []
                    if save_now:
                        save_checkpoint(checkpoint_path, self)
                        saved_at = self.step
        finally:
            bar.close()
            self.plan.seconds_spent += self._seconds_in_call()
            self._call_started = None
        if checkpoint_path is not None and saved_at != self.step:
            save_checkpoint(checkpoint_path, self)
        return self.losses

    def _next_plan(self, steps: int | None, minutes: float | None) -> TrainingPlan:
        """A new plan from here for a budget; without one, the current plan if it has steps or time left."""
        if steps is not None or minutes is not None:
            return TrainingPlan.of(self.step, steps, minutes)
        if self.plan is None:
            raise ValueError("give a training budget: steps or minutes (this run has no plan to continue)")
        if self.plan.progress(self.step) >= 1.0:
            raise ValueError(
                f"this run's plan is complete at step {self.step}: give a budget (steps or minutes) to train further"
            )
        return self.plan

    def _seconds_in_call(self) -> float:
        return time.monotonic() - self._call_started if self._call_started is not None else 0.0

    def _set_learning_rate(self) -> None:
        lr = learning_rate(self.train_config, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _progress_bar(self, enabled: bool):
        """Steps left in a step plan, else seconds left in a time plan."""
        plan = self.plan
        if plan.steps is not None:
            done = self.step - plan.first_step
            return progress_bar(plan.steps, "training", "step", enabled, initial=done)
        return progress_bar(round(plan.seconds), "training", "s", enabled, initial=round(plan.seconds_spent))

    def _batches_from_here(self) -> Iterator[tuple[torch.Tensor, Condition | None]]:
        """The iterator of the last train() call when it is still at this step, else a new one: training in chunks
        then starts DataLoader workers once, not once per chunk."""
        if self._batch_iterator is None or self._batch_iterator_step != self.step:
            self._batch_iterator = self.batches()
        return self._batch_iterator

    def _log(self, pending: list[torch.Tensor], bar, on_log: Callable[[Trainer], None] | None) -> None:
        """Read the pending losses back (one host-device sync), stop on NaN/inf, move the bar, call on_log."""
        values = torch.stack(pending).float().cpu().tolist()
        first_step = self.step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"training stopped: the loss became {value} at step {first_step + offset}; "
                    "the last saved checkpoint is unchanged (try a lower lr)"
                )
        self.losses.extend(values)
        plan = self.plan
        done = self.step - plan.first_step if plan.steps is not None else plan.seconds_spent + self._seconds_in_call()
        bar.update(round(done) - bar.n)
        bar.set_postfix(loss=f"{values[-1]:.4f}", images=self.images_seen)
        if on_log is not None:
            on_log(self)

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped, its plan included."""
        plan = None
        if self.plan is not None:
            plan = dataclasses.replace(self.plan, seconds_spent=self.plan.seconds_spent + self._seconds_in_call())
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
            "step": self.step,
            "images_seen": self.images_seen,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "plan": dataclasses.asdict(plan) if plan is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(self._optimizer_state_for_this_device(state["optimizer"]))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state.get("generator_device") == self.device.type:
            self.generator.set_state(state["generator"].cpu())
        else:  # CPU and CUDA generators have different states: continue with a fresh, seeded stream
            self.generator.manual_seed(self.train_config.seed * 1_000_003 + self.step)
        self.images_seen = int(state["images_seen"])
        self.losses = [float(v) for v in state["losses"]]
        self.plan = TrainingPlan(**state["plan"]) if state.get("plan") is not None else None
        self._batch_iterator = None

    def _optimizer_state_for_this_device(self, saved: dict) -> dict:
        """The saved AdamW state with this device's kernel choice (fused or not, section B): load_state_dict would
        otherwise carry an MPS run's unfused AdamW onto the CPU or a GPU, or the reverse."""
        fused = self.optimizer.param_groups[0].get("fused")
        return {**saved, "param_groups": [{**group, "fused": fused} for group in saved["param_groups"]]}


def _check_objective(model: ModelConfig, train: TrainConfig) -> None:
    """The training settings that apply to the model's objective: min-SNR weights DDPM's discrete timesteps."""
    if model.schedule == "flow" and train.min_snr_gamma is not None:
        raise ValueError("the flow trains on plain MSE: min_snr_gamma must be None (min-SNR weights DDPM's timesteps)")


def progress_bar(total: int, description: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar (notebook or terminal, whichever runs) for the long loops: training and sampling."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit=unit, disable=not enabled, dynamic_ncols=True)


def plot_loss_weights(schedule: NoiseSchedule, gamma: float = 5.0):
    """The weight each choice puts on the x_0 error at every timestep: what "predict eps", "predict v" and min-SNR
    mean as reweightings of one objective (section 6)."""
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    snr = schedule.snr.numpy()
    curves = {
        "eps, plain MSE: SNR": snr,
        "v, plain MSE: SNR + 1": snr + 1,
        f"v, capped min-SNR: min(SNR + 1, {gamma:g})": np.minimum(snr + 1, gamma),
        f"v, paper's min-SNR: min(SNR, {gamma:g})": np.minimum(snr, gamma),
    }
    for k, (label, weight) in enumerate(curves.items()):  # eps runs under v's curve at small t: drawn on top, dashed
        ax.plot(weight, label=label, **({"ls": "--", "lw": 2.2, "zorder": 3} if k == 0 else {"lw": 1.5}))
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("weight on ||x̂_0 - x_0||²")
    ax.legend(fontsize=8)
    return fig


def implied_weights(num_timesteps: int = 1000, gamma: float = 5.0, span: float = 12.0) -> dict[str, np.ndarray]:
    """Where each objective spends its effort along the log-SNR lambda = log(alpha^2 / sigma^2): the weight it puts on
    the noise error ||eps_hat - eps||^2 (the ELBO's own terms) per unit of lambda, as in Kingma & Gao 2023 (fig. 2),
    on the grid "lambda" from -span to span, each normalised to unit area there.

    It is p(lambda) w lam / SNR: how often training visits lambda, times the loss weight, times the x_0 weight of the
    target (x0_weight_of), turned into a noise weight (||x0_hat - x_0||^2 = ||eps_hat - eps||^2 / SNR). DDPM's
    uniform timesteps visit lambda at 1 / |d lambda / d index|; the flow's t, with lambda = 2 log((1 - t) / t),
    at p(t) t (1 - t) / 2.
    """
    grid = np.linspace(-span, span, 481)
    curves = {"lambda": grid}
    for name, kind, prediction, gamma_ in (
        ("DDPM: linear, eps, plain MSE", "linear", "eps", None),
        (f"recipe: cosine, v, capped min-SNR {gamma:g}", "cosine", "v", gamma),
    ):
        schedule = NoiseSchedule.create(kind, num_timesteps)
        lam = schedule.snr.log().numpy()  # falling with the index
        weight = schedule.loss_weights(prediction, gamma_) * x0_weight_of(prediction, schedule.snr) / schedule.snr
        density = weight.numpy() / np.abs(np.gradient(lam))
        curves[name] = np.interp(grid, lam[::-1], density[::-1], left=0.0, right=0.0)
    t = 1 / (1 + np.exp(grid / 2))  # the flow's time at each lambda
    visits = {"rectified flow, uniform t": np.ones_like(t)}
    visits["rectified flow, logit-normal t (SD3)"] = np.exp(-0.5 * np.log(t / (1 - t)) ** 2) / (t * (1 - t))
    for name, p_t in visits.items():
        snr = ((1 - t) / t) ** 2
        curves[name] = p_t * t * (1 - t) / 2 / t**2 / snr  # x_0 weight of the velocity: 1 / t^2
    return {
        name: values if name == "lambda" else values / np.trapezoid(values, grid) for name, values in curves.items()
    }


def plot_implied_weights(num_timesteps: int = 1000, gamma: float = 5.0):
    """The curves of implied_weights in one picture: DDPM, the recipe and rectified flow side by side."""
    fig = _figure(6.5, 3.4)
    ax = fig.subplots()
    curves = implied_weights(num_timesteps, gamma)
    grid = curves.pop("lambda")
    for name, weight in curves.items():
        ax.plot(grid, weight, label=name)
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("log SNR λ (pure noise ← → clean image)")
    ax.set_ylabel("weight on ||ε̂ - ε||² per unit λ")
    ax.set_title("Where each objective puts its effort (each curve: unit area)")
    ax.legend(fontsize=8)
    return fig


def plot_losses(losses: Sequence[float], smooth: int = 50):
    """Loss per step (faint) and its running mean."""
    fig = _figure(6, 3)
    ax = fig.subplots()
    values = np.asarray(losses, dtype=np.float64)
    ax.plot(values, alpha=0.3, lw=0.8, label="per step")
    if len(values) >= smooth:
        running = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
        ax.plot(np.arange(smooth - 1, len(values)), running, label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


@torch.no_grad()
def loss_by_timestep(
    model: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    loss_weights: torch.Tensor | None = None,
    n: int = 256,
    bins: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, unweighted loss, weighted loss) at `bins` evenly spaced timesteps, each on n fresh images.

    Shows where the network still errs: the mean ||output - target||^2 per timestep, before and after w(t).
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0 = make_shapes(n, seed=(seed, 1)).images
    ts = torch.linspace(0, len(schedule) - 1, bins).round().long()
    raw, weighted = [], []
    was_training = model.training
    model.eval()
    for t_value in ts:
        t = torch.full((n,), int(t_value))
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.noised(x0, noise, t) * float(schedule.input_scales[int(t_value)])  # the network's input
        output = model(x_t.to(device), schedule.timesteps[t].to(device)).float().cpu()
        error = float(F.mse_loss(output, schedule.target(prediction, x0, noise, t)))
        raw.append(error)
        weighted.append(error * (float(loss_weights[int(t_value)]) if loss_weights is not None else 1.0))
    model.train(was_training)
    return ts.numpy(), np.array(raw), np.array(weighted)


def plot_loss_by_timestep(ts: np.ndarray, raw: np.ndarray, weighted: np.ndarray):
    """The loss against the timestep, before and after the min-SNR weight."""
    fig = _figure(6, 3)
    ax = fig.subplots()
    ax.plot(ts, raw, "o-", label="||output - target||²")
    ax.plot(ts, weighted, "s--", label="× w(t) (what training minimises)")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t (0 = almost clean, T-1 = pure noise)")
    ax.set_ylabel("mean squared error")
    ax.legend()
    return fig


# ------------------------------------------------------------------------------------------
# 7. Sampling: from pure noise x_T ~ N(0, I) back to an image, one denoising step at a time
# ------------------------------------------------------------------------------------------
#
# The backward process (Ho et al. 2020, Algorithm 2) is a loop over the steps of a schedule, from pure noise to a
# clean image. At each step a denoiser gives x0_hat, the network's estimate of the clean image, and a sampler moves
# x_t towards it. A sampler is one step function, registered by name in SAMPLERS:
#     step(schedule, i, x_t, denoise, state) -> the sample one index less noisy (the finished one after i = 0)
# `schedule` is the respaced schedule, i the index of the current step in it (from len-1, pure noise, down to 0),
# `denoise(x, i)` the clipped x0_hat of any x at any index (most samplers call it once per step, Heun twice), and
# `state` what a step may use besides: fresh noise, eta, the budget of network evaluations, and its own memory.

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]  # (x at index i of the schedule, i) -> x0_hat


@dataclass
class SamplerState:
    """What a step may use besides x_t and the denoiser; one per chunk of images, for the whole loop."""

    noise: Callable[[], torch.Tensor]  # the next fresh N(0, I) draw, one per image (stochastic samplers)
    eta: float = 0.0  # DDIM's noise scale
    evaluations: int = 0  # network evaluations per image this run may spend (Heun spends two on most steps)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # what a multistep solver keeps between steps


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its step function and what it takes."""

    name: str
    step: Callable[[NoiseSchedule, int, torch.Tensor, Denoiser, SamplerState], torch.Tensor]
    takes_eta: bool
    spacing: str  # the timestep grid it samples on (NoiseSchedule.respaced)
    evaluations_per_step: int  # network evaluations of a full step: 1, or 2 for Heun

    def grid_steps(self, evaluations: int) -> int:
        """How many steps `evaluations` network evaluations per image pay for; every step ends with one evaluation
        to spare for the last (first-order) step, so a two-evaluation solver gets evaluations // 2 + 1."""
        return evaluations if self.evaluations_per_step == 1 else evaluations // self.evaluations_per_step + 1


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, *, takes_eta: bool = False, spacing: str = "time", evaluations_per_step: int = 1):
    """Adds a step function to SAMPLERS under `name`: the command line and `sample` then offer it."""

    def register(step: Callable) -> Callable:
        SAMPLERS[name] = Sampler(name, step, takes_eta, spacing, evaluations_per_step)
        return step

    return register


@register_sampler("ddpm")
def ddpm_step(schedule: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState):
    """One step of ancestral sampling (Ho et al. 2020, arXiv 2006.11239, eq. (6)-(7) with x0_hat for x_0).

    x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) = N(coef1 x0_hat + coef2 x_t, beta_tilde_t I); no noise at the last step.
    """
    x0_hat = denoise(x_t, i)
    # 1. The posterior mean: coef1 x0_hat + coef2 x_t
    mean = float(schedule.posterior_mean_coef1[i]) * x0_hat + float(schedule.posterior_mean_coef2[i]) * x_t
    if i == 0:
        return mean
    # 2. Plus the posterior's standard deviation times fresh noise
    return mean + math.sqrt(float(schedule.posterior_variance[i])) * state.noise()


# The deterministic samplers walk trailing grids: at 2-10 evaluations every one of their steps then does work, and
# they draw as valid or more (benchmarks/RESULTS.md, "Diffusion or flow matching", the diagnosis).
@register_sampler("ddim", takes_eta=True, spacing="time-trailing")
def ddim_step(schedule: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState):
    """One DDIM step (Song et al. 2021, arXiv 2010.02502, eq. (12)); eta = 0 is deterministic, eta = 1 is DDPM.

    x_{t-1} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)   (eq. (16)).
    """
    ab, ab_prev = float(schedule.alpha_bars[i]), float(schedule.alpha_bars_prev[i])
    x0_hat = denoise(x_t, i)
    # 1. The noise that x_t and the clipped x0_hat imply
    eps_hat = (x_t - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
    # 2. The noise scale of this step (0 at the last step, where ab_prev = 1)
    sigma = state.eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    # 3. Point to x0_hat, keep the rest of the noise direction, add fresh noise
    x_prev = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps_hat
    if sigma > 0:
        x_prev = x_prev + sigma * state.noise()
    return x_prev


def make_denoiser(
    model_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    prediction: str,
    clip_x0: bool | str = True,
) -> Denoiser:
    """The denoiser every sampler calls: x0_hat for x at index i, from the network's output at i's timestep.

    model_output(x, t) is the network at training timesteps t (with guidance, section 11). x0_hat is clipped to
    [-1, 1]: the data lie there, so an estimate outside it is surely wrong (clip_x0=False shows why). clip_x0 may
    also name another rule of CLIP_RULES, to compare them.
    """
    rule = {True: "clip", False: "none"}.get(clip_x0, clip_x0)
    _check_choice("clip_x0", rule, CLIP_RULES)
    timesteps: dict[torch.device, torch.Tensor] = {}

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        if x.device not in timesteps:  # the training timestep of each index, on the device once
            timesteps[x.device] = schedule.timesteps.to(x.device)
        index = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        scale = float(schedule.input_scales[i])  # 1, but for a path with other scales such as the flow's (section 4)
        output = model_output(x * scale if scale != 1.0 else x, timesteps[x.device][index])
        # x0_hat = (x_t - sigma eps_hat) / alpha for eps, alpha x_t - sigma v_hat for v (section 4)
        x0_hat = schedule.predict_x0(prediction, x, output, index)
        return CLIP_RULES[rule](x0_hat, i)

    return denoise


def _dynamic_threshold(x0_hat: torch.Tensor, quantile: float = 0.995) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen, arXiv 2205.11487, section 2.3): per image, s = the 99.5th percentile of |x0_hat|,
    at least 1; clip to [-s, s] and divide by s, so a saturated estimate is pulled in rather than cut."""
    s = x0_hat.abs().flatten(1).quantile(quantile, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    return x0_hat.clamp(-s, s) / s


# How x0_hat is kept in the data's range, as a function of the estimate and its index: every step (the default),
# by dynamic thresholding, only at the last step (i = 0, the sample itself), or never.
CLIP_RULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "clip": lambda x0_hat, i: x0_hat.clamp(-1, 1),
    "dynamic": lambda x0_hat, i: _dynamic_threshold(x0_hat),
    "last": lambda x0_hat, i: x0_hat.clamp(-1, 1) if i == 0 else x0_hat,
    "none": lambda x0_hat, i: x0_hat,
}


def backward_process(
    x_T: torch.Tensor, schedule: NoiseSchedule, sampler: Sampler, denoise: Denoiser, state: SamplerState
) -> torch.Tensor:
    """DDPM's sampling loop (Ho et al. 2020, Algorithm 2), for any registered sampler.

        x_T ~ N(0, I);  for i = len-1, ..., 0:  x_{i-1} = step(x_i, i)  (a step calls denoise for x0_hat);  return x
    `schedule` is the (respaced) schedule to walk; `sample` draws x_T, splits the images into chunks and keeps
    snapshots, so this is all that happens between pure noise and an image.
    """
    x = x_T
    for i in reversed(range(len(schedule))):  # from the noisiest index down to the cleanest
        x = sampler.step(schedule, i, x, denoise, state)
    return x


# Classifier-free guidance enters sampling here, through the network output the denoiser reads; section 11
# explains it.


def guided_output(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: Condition | Prompt | None, guidance: float
) -> torch.Tensor:
    """The network output for x at t: unconditional, conditional, or guided (both passes in one batched forward).
    The unconditional pass asks for nothing: the null request, or the empty prompt."""
    if condition is None or guidance == 0:
        return model(x, t)
    if guidance == 1:
        return model(x, t, condition)
    both = model(torch.cat([x, x]), torch.cat([t, t]), condition.cat(type(condition).null(len(x), x.device)))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def runtime_output(
    model: nn.Module, runtime: Runtime, condition: Condition | None, guidance: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_output(x, t) for make_denoiser: the (guided) network output in the runtime's precision, as float32."""

    def model_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            return guided_output(model, x, t, condition, guidance).float()

    return model_output


def _check_guidance(model: nn.Module, condition: Condition | Prompt | None, n: int, guidance: float) -> None:
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a number >= 0, got {guidance}")
    if condition is None:
        return
    config = getattr(model, "config", None)
    if not getattr(config, "conditional", False):
        raise ValueError("this model is unconditional (trained without requests): it cannot be asked for a shape")
    if isinstance(condition, Prompt) and config.conditioning != "prompt":
        raise ValueError(
            "this model reads requests (--shape, --size, --center), not prompts: train one with conditioning 'prompt'"
        )
    if len(condition) != n:
        raise ValueError(f"the condition holds {len(condition)} requests for {n} images")


def _condition_for(
    model: nn.Module, condition: Condition | None, prompt: str | Sequence[str] | None, n: int
) -> Condition | Prompt | None:
    """What the model reads: the request, or the prompts (one text for all n, or one each, checked); a request to
    a model that reads prompts is written as a prompt (prompt_of_request), one way in for both."""
    if prompt is not None and condition is not None:
        raise ValueError("ask with a request (condition) or a prompt, not both")
    if prompt is not None:
        texts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} prompts for {n} images")
        return Prompt.of(texts)
    if condition is not None and getattr(getattr(model, "config", None), "conditioning", None) == "prompt":
        return Prompt.of(prompt_of_request(condition))
    return condition


def default_guidance(condition: Condition | Prompt | None) -> float:
    """The guidance scale of sampling when none is given: DEFAULT_PROMPT_GUIDANCE for prompts (a request to a prompt
    model is one), DEFAULT_GUIDANCE otherwise."""
    return DEFAULT_PROMPT_GUIDANCE if isinstance(condition, Prompt) else DEFAULT_GUIDANCE


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, 1, 64, 64) in [-1, 1], on the CPU
    timesteps: list[int] = field(default_factory=list)  # the training timesteps of the snapshots
    x_t: list[torch.Tensor] = field(default_factory=list)  # the noisy sample at each snapshot
    x0_hat: list[torch.Tensor] = field(default_factory=list)  # the network's estimate of x_0 there


@torch.no_grad()
def sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    n: int,
    steps: int = DEFAULT_STEPS,
    sampler: str = DEFAULT_SAMPLER,
    eta: float | None = None,
    seed: int = 0,
    prediction: str | None = None,
    condition: Condition | None = None,
    guidance: float | None = None,
    save_at: Sequence[int] = (),
    prompt: str | Sequence[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    precision: str | None = None,
    initial_noise: torch.Tensor | None = None,
    spacing: str | None = None,
    clip_x0: bool | str = True,
    editing: Edit | None = None,
) -> SampleResult:
    """Generate n images from pure noise with `steps` network evaluations per image, for every sampler (Heun makes
    two per step, so it takes steps // 2 + 1 steps), on a grid respaced from the T timesteps of training.

    condition (a Condition of n requests) or prompt (a text, or n texts, for a model with conditioning "prompt")
    and guidance (None: default_guidance): section 11. save_at lists steps (0 = the first, from pure
    noise) whose x_t and x0_hat are kept for pictures. Images are made in chunks of batch_size, so memory stays
    bounded for any n, and each image's noise comes from its own generator: the same seed gives the same images
    whatever batch_size is. initial_noise (n, 1, 64, 64) replaces the seeded x_T (interpolations, section 10);
    spacing replaces the sampler's own timestep grid (NoiseSchedule.respaced); clip_x0=False leaves x0_hat
    unclipped, to show why it is clipped (or names another of CLIP_RULES). precision: this device's
    (choose_precision) unless given, as in Trainer. editing (section 15) makes it an edit of given images: it may cut
    the grid to start from a noised image part of the way down (SDEdit), and wrap the sampler's step to keep known
    pixels (inpainting); the loop stays this one.
    """
    method, eta, prediction = _check_sample_args(model, schedule, n, steps, sampler, eta, prediction, batch_size)
    condition = _condition_for(model, condition, prompt, n)
    guidance = default_guidance(condition) if guidance is None else guidance
    _check_guidance(model, condition, n, guidance)
    if editing is not None:
        editing.check(n)
    if initial_noise is not None and tuple(initial_noise.shape) != (n, 1, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(initial_noise.shape)
        raise ValueError(f"initial_noise must have shape ({n}, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {shape}")
    runtime = setup(next(model.parameters()).device, precision)
    spaced = schedule.respaced(method.grid_steps(steps), spacing or method.spacing)
    evaluations = steps
    if editing is not None:  # the grid from the edit's start, and the evaluations it spends there
        spaced, evaluations = editing.grid(spaced), editing.evaluations(method, spaced, steps)
    snapshots = _Snapshots(spaced, save_at)
    result = SampleResult(torch.empty(n, 1, IMAGE_SIZE, IMAGE_SIZE), timesteps=snapshots.timesteps())
    chunks = [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]
    bar = progress_bar(evaluations * len(chunks), f"sampling ({sampler}, {evaluations} evaluations)", "eval", progress)
    was_training = model.training
    model.eval()
    try:
        with runtime.compute():
            for start, stop in chunks:
                generators = [
                    torch.Generator(runtime.device).manual_seed(seed * 1_000_003 + k) for k in range(start, stop)
                ]
                x_T = next(_noise_per_image(generators, runtime.device, 1))  # x_T ~ N(0, I), one per image
                if initial_noise is not None:
                    x_T = initial_noise[start:stop].to(runtime.device, torch.float32)
                draws = (len(spaced) - 1) * (editing.resample if editing is not None else 1)  # RePaint retakes steps
                noise = _noise_per_image(generators, runtime.device, draws)  # drawn as steps ask
                chunk_condition = condition.select(slice(start, stop)).to(runtime.device) if condition else None
                model_output = runtime_output(model, runtime, chunk_condition, guidance)
                denoise = snapshots.watch(make_denoiser(model_output, spaced, prediction, clip_x0), bar)
                state = SamplerState(noise=lambda noise=noise: next(noise), eta=eta, evaluations=evaluations)
                walk = method
                if editing is not None:  # start from the edited images, keep their known pixels at every step
                    x_T = editing.start(x_T, slice(start, stop), spaced)
                    walk = editing.sampler(method, slice(start, stop), generators)
                result.images[start:stop] = backward_process(x_T, spaced, walk, denoise, state).clamp(-1, 1).cpu()
    finally:
        bar.close()
        model.train(was_training)
    result.x_t, result.x0_hat = snapshots.joined()
    return result


def _check_sample_args(model, schedule, n, steps, sampler, eta, prediction, batch_size):
    """(the Sampler, eta, the prediction type), or a ValueError naming the bad argument."""
    _check_positive_int("n", n)
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    _check_choice("sampler", sampler, SAMPLERS)
    method = SAMPLERS[sampler]
    if method.grid_steps(steps) > len(schedule):
        grid, most = method.grid_steps(steps), len(schedule)
        raise ValueError(f"steps={steps} needs {grid} timesteps of {sampler}, more than the {most} of training")
    prediction = prediction or getattr(getattr(model, "config", None), "prediction", None)
    if prediction is None:
        raise ValueError("prediction ('eps' or 'v') must be given for a model without a config")
    _check_choice("prediction", prediction, PREDICTIONS)
    if eta is not None and not method.takes_eta:
        raise ValueError(f"eta applies to the ddim sampler only (ddpm is ddim with eta=1), got eta={eta}")
    eta = 0.0 if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return method, eta, prediction


class _Snapshots:
    """x_t and x0_hat at chosen steps of a sampling run (0 = the first, from pure noise), for pictures, taken from
    the denoiser's calls; it also moves the progress bar, one tick per network evaluation."""

    def __init__(self, spaced: NoiseSchedule, save_at: Sequence[int]) -> None:
        bad = [k for k in save_at if not 0 <= k < len(spaced)]
        if bad:
            raise ValueError(f"save_at steps must be in [0, {len(spaced) - 1}], got {bad}")
        self.spaced = spaced
        self.steps = sorted(set(save_at))
        self.chunks: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []

    def timesteps(self) -> list[int]:
        return [int(self.spaced.timesteps[len(self.spaced) - 1 - k]) for k in self.steps]

    def watch(self, denoise: Denoiser, bar) -> Denoiser:
        """denoise, recording (x, x0_hat) at the saved indices of one chunk. The last call at an index wins: Heun
        also evaluates the index ahead, at a trial point, before the step that starts there."""
        indices, kept = {len(self.spaced) - 1 - k for k in self.steps}, {}
        self.chunks.append(kept)

        def watched(x: torch.Tensor, i: int) -> torch.Tensor:
            x0_hat = denoise(x, i)
            bar.update(1)
            if i in indices:
                kept[i] = (x.cpu(), x0_hat.cpu())
            return x0_hat

        return watched

    def joined(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(x_t, x0_hat) at each saved step, all chunks joined."""
        indices = [len(self.spaced) - 1 - k for k in self.steps]
        return (
            [torch.cat([chunk[i][0] for chunk in self.chunks]) for i in indices],
            [torch.cat([chunk[i][1] for chunk in self.chunks]) for i in indices],
        )


def _noise_per_image(
    generators: list[torch.Generator], device: torch.device, count: int, block: int = 10
) -> Iterator[torch.Tensor]:
    """`count` noise tensors (N, 1, 64, 64); image k's noise comes from generators[k] alone.

    Drawn `block` steps at a time, so a GPU gets N random-number launches per block, not per step.
    """
    for start in range(0, count, block):
        size = min(block, count - start)
        draws = [torch.randn(size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g, device=device) for g in generators]
        yield from torch.stack(draws, dim=1)


class TrainingSnapshots:
    """An on_log callback for Trainer.train that samples a few images at chosen shares of the plan.

    They show the model learning: blobs first, then one shape, then crisp edges. Each snapshot draws the same
    starting noise (seed 0) with a few deterministic DPM-Solver++ steps, so the pictures differ only by training.
    """

    def __init__(self, at: Sequence[float] = (0.1, 0.25, 0.5, 1.0), n: int = 8, steps: int = 10) -> None:
        self.at, self.n, self.steps = sorted(at), n, steps
        self.images: list[torch.Tensor] = []
        self.labels: list[str] = []

    def __call__(self, trainer: Trainer) -> None:
        share = trainer.progress()
        if len(self.images) < len(self.at) and share >= self.at[len(self.images)] - 1e-9:
            self._take(trainer, f"{share:.0%} of the budget, step {trainer.step}")

    def finish(self, trainer: Trainer) -> None:
        """The last snapshot, after train() returns (its last step is never seen at 100 %)."""
        if len(self.images) < len(self.at):
            self._take(trainer, f"end, step {trainer.step}")

    def _take(self, trainer: Trainer, label: str) -> None:
        result = sample(
            trainer.sampling_model, trainer.schedule, self.n, steps=self.steps, sampler="dpm++", progress=False
        )
        self.images.append(result.images)
        self.labels.append(label)

    def plot(self):
        """Rows: the snapshots, in training order."""
        images = torch.cat(self.images) if self.images else torch.empty(0, 1, IMAGE_SIZE, IMAGE_SIZE)
        return plot_grid(images, columns=self.n, title="Samples during training (same noise)", row_labels=self.labels)


# ------------------------------------------------------------------------------------------
# 8. The backward process, in pictures
# ------------------------------------------------------------------------------------------


def plot_backward_process(result: SampleResult, rows: int | Sequence[int] = 4, show_x0: bool = True) -> object:
    """Samples (rows: how many, or which) at the saved steps (columns): x_t, the network's estimate x0_hat beside it,
    and the sample.

    The last column is the finished sample, after the last step; every other column is a moment on the way.
    """
    chosen = list(range(rows)) if isinstance(rows, int) else list(rows)
    columns = len(result.timesteps)
    per_step = 2 if show_x0 else 1
    fig = _figure((columns * per_step + 1) * 1.0 + 0.5, len(chosen) * 1.15 + 0.7)
    axes = fig.subplots(len(chosen), columns * per_step + 1, squeeze=False)
    for row, r in enumerate(chosen):
        for c, t in enumerate(result.timesteps):
            _show(axes[row, c * per_step], result.x_t[c][r].clamp(-1, 1), f"x_t at t={t}" if row == 0 else None)
            if show_x0:
                _show(axes[row, c * per_step + 1], result.x0_hat[c][r], f"x̂_0 at t={t}" if row == 0 else None)
        _show(axes[row, -1], result.images[r], "sample" if row == 0 else None)
    fig.suptitle("Backward process: from pure noise (left) to a shape (right); x̂_0 is the network's estimate of x_0")
    return fig


def animate_backward_process(result: SampleResult, samples: int = 4, interval_ms: int = 60):
    """A matplotlib animation of the backward process: x_t (top row) above x0_hat (bottom row), one frame per
    snapshot, then the finished samples. Show it with `.to_jshtml()` or save it with `save_animation`."""
    from matplotlib.animation import FuncAnimation
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    samples = min(samples, len(result.images))
    fig = _figure(samples * 1.3, 3.0)
    FigureCanvasAgg(fig)  # the animation writers draw through a canvas
    axes = fig.subplots(2, samples, squeeze=False)
    shown = []
    for k in range(samples):
        shown.append(
            (
                axes[0, k].imshow(np.zeros((IMAGE_SIZE, IMAGE_SIZE)), cmap="gray", vmin=-1, vmax=1),
                axes[1, k].imshow(np.zeros((IMAGE_SIZE, IMAGE_SIZE)), cmap="gray", vmin=-1, vmax=1),
            )
        )
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("x_t")
    axes[1, 0].set_ylabel("x̂_0")
    title = fig.suptitle("")
    frames = len(result.timesteps) + 1

    def draw(frame: int):
        last = frame == frames - 1
        for k, (top, bottom) in enumerate(shown):
            top.set_data((result.images[k] if last else result.x_t[frame][k].clamp(-1, 1)).squeeze().numpy())
            bottom.set_data((result.images[k] if last else result.x0_hat[frame][k]).squeeze().numpy())
        title.set_text(
            "finished samples" if last else f"step {frame + 1} of {frames - 1}: t = {result.timesteps[frame]}"
        )
        return [artist for pair in shown for artist in pair] + [title]

    return FuncAnimation(fig, draw, frames=frames, interval=interval_ms, repeat_delay=1500, blit=False)


def save_animation(animation, path: str | os.PathLike, fps: int = 15) -> Path:
    """Write an animation as a GIF (Pillow, which matplotlib brings), e.g. backwards_process.gif."""
    from matplotlib.animation import PillowWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    animation.save(path, writer=PillowWriter(fps=fps), dpi=60)
    return path


# ------------------------------------------------------------------------------------------
# 9. Evaluation: does each sample show exactly one clean circle or square?
# ------------------------------------------------------------------------------------------

VALID_IOU = 0.90  # a blob is a valid shape when its IoU with the best ideal shape is >= this
MIN_BLOB_PIXELS = 5  # smaller specks are ignored when counting blobs
MID_GRAY = (32, 223)  # pixels strictly between these uint8 values count as blur


@dataclass
class ShapeReading:
    """What the evaluator sees in one image."""

    blobs: int
    label: int  # the class (index into SHAPES) whose ideal shape matches best (-1 if no blob)
    iou: float
    center: tuple[float, float]
    size: float  # the size of that class's ideal shape of equal area: a circle's diameter, a square's side

    @property
    def valid(self) -> bool:
        return self.blobs == 1 and self.iou >= VALID_IOU


_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)


def ideal_shape_iou(mask: np.ndarray) -> tuple[int, float]:
    """The class (index into SHAPES) whose ideal shape of equal area and centroid best overlaps a binary mask, and
    that IoU: a filled circle, an axis-aligned square, ..."""
    area = float(mask.sum())
    if area == 0:
        return -1, 0.0
    dx, dy = _GRID_X - _GRID_X[mask].mean(), _GRID_Y - _GRID_Y[mask].mean()
    ious = []
    for shape in SHAPES:
        ideal = shape.ideal(dx, dy, shape.size_of_area(area))
        ious.append(float((mask & ideal).sum() / (mask | ideal).sum()))
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
    size = SHAPES[label].size_of_area(float(blob.sum()))
    return ShapeReading(len(big), label, iou, (float(_GRID_X[blob].mean()), float(_GRID_Y[blob].mean())), size)


def mid_gray_mask(images: np.ndarray) -> np.ndarray:
    """True at each uint8 pixel strictly between MID_GRAY's bounds: neither background nor shape (blur, gray)."""
    return (images > MID_GRAY[0]) & (images < MID_GRAY[1])


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two 1-D samples (mean gap between matching quantiles); NaN if one is empty."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    q = np.linspace(0, 1, 201)
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


_REFERENCE_CACHE: dict[int, list[ShapeReading]] = {}


def _reference_readings(n: int = 2048) -> list[ShapeReading]:
    if n not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[n] = [read_shape(im) for im in model_to_uint8(make_shapes(n, seed=12345).images)]
    return _REFERENCE_CACHE[n]


def evaluate_samples(
    samples: torch.Tensor | np.ndarray, reference: Sequence[ShapeReading] | None = None
) -> dict[str, float]:
    """Objective quality of a batch of generated images.

    valid          share with exactly one blob whose IoU with an ideal circle/square >= 0.90
    circle_share   share of circles among the valid shapes (training data: 0.5)
    mid_gray       share of pixels strictly between 32 and 223 of 255 (blur and gray backgrounds)
    size_w1        distance (pixels) between the size distributions of valid samples and real data
    position_w1    same for the centre, averaged over x and y
    circle_share and the distances are NaN when no sample is valid: there is nothing to measure.
    Accepts (N, 1, 64, 64) floats in [-1, 1] or (N, 64, 64) uint8.
    """
    images = _as_uint8_images(samples)
    valid = [r for r in (read_shape(image) for image in images) if r.valid]
    reference = list(reference) if reference is not None else _reference_readings()
    ref_valid = [r for r in reference if r.valid]

    def w1(values: Callable[[ShapeReading], float]) -> float:
        return wasserstein_1d(np.array([values(r) for r in valid]), np.array([values(r) for r in ref_valid]))

    return {
        "n": len(images),
        "valid": len(valid) / len(images),
        "circle_share": float(np.mean([r.label == CIRCLE for r in valid])) if valid else math.nan,
        "mid_gray": float(mid_gray_mask(images).mean()),
        "size_w1": w1(lambda r: r.size),
        "position_w1": float(np.mean([w1(lambda r: r.center[0]), w1(lambda r: r.center[1])])),
    }


def train_and_evaluate(
    model_config: ModelConfig,
    train_config: TrainConfig,
    minutes: float,
    device: torch.device | str | None = None,
    n: int = 256,
    steps: int = DEFAULT_STEPS,
    sampler: str = DEFAULT_SAMPLER,
    seed: int = 0,
) -> dict[str, float]:
    """Train a fresh model for `minutes`, sample n images from it and score them: one experiment in one call."""
    trainer = Trainer(model_config, train_config, device=device)
    trainer.train(minutes=minutes)
    result = sample(trainer.sampling_model, trainer.schedule, n, steps=steps, sampler=sampler, seed=seed)
    return {"steps_trained": trainer.step, **evaluate_samples(result.images)}


def percent_with_error(share: float, n: int) -> str:
    """A share of n samples as "97.3 ± 1.0 %": the ± is its standard error, sqrt(p (1 - p) / n), so two figures
    whose difference is within about twice their errors are not told apart by n samples."""
    if math.isnan(share):
        return "-"
    return f"{100 * share:.1f} ± {100 * math.sqrt(share * (1 - share) / n):.1f} %"


def mixed_classes(images: torch.Tensor | np.ndarray, k: int) -> list[int]:
    """Indices of k samples taking the classes in turn (circle, square, ...) among the valid ones, in order, filled
    up with the first others: rows for a picture that should not happen to show one class only."""
    readings = [read_shape(image) for image in _as_uint8_images(images)]
    by_class = [[j for j, r in enumerate(readings) if r.valid and r.label == c] for c in range(len(SHAPES))]
    chosen = [j for group in itertools.zip_longest(*by_class) for j in group if j is not None][:k]
    return chosen + [j for j in range(len(readings)) if j not in chosen][: k - len(chosen)]


def outline_valid(images: torch.Tensor | np.ndarray) -> list[bool]:
    """For plot_grid's outline: True where the evaluation reads one valid shape."""
    return [read_shape(image).valid for image in _as_uint8_images(images)]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (for IPython.display.Markdown): floats to 3 significant digits, NaN and None as "-"."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
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
        raise ValueError(
            f"a samples array must have shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}) with N >= 1, got {samples.shape}"
        )
    return samples


# ------------------------------------------------------------------------------------------
# 10. Fewer steps: DPM-Solver++ on the probability-flow ODE
# ------------------------------------------------------------------------------------------
#
# Every sample path of the reverse SDE has a deterministic twin, the probability-flow ODE (Song et al. 2021,
# arXiv 2011.13456, eq. (13)), whose solutions carry x_T ~ N(0, I) to the same distribution of images. In the
# variables lambda = log(alpha / sigma) and x / sigma it reads d(x/sigma)/d(lambda) = e^lambda x0_hat(x, lambda)
# (Lu et al. 2022, arXiv 2211.01095, eq. (9)), so an exact step from s to t is
#     x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0_hat d(lambda).
# Holding x0_hat constant over the step gives  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_hat,
# h = lambda_t - lambda_s: exactly the DDIM step with eta = 0, i.e. DDIM is the first-order (Euler) solver of this
# ODE. DPM-Solver++(2M) extrapolates x0_hat linearly from the previous step's estimate: second order, for the cost of
# one network evaluation per step.


# On the log-SNR grid (trailing, as ddim's), where its steps are equal in lambda: at 10 and 20 steps it beats the
# time grid by far (benchmarks/RESULTS.md, "Samplers").
@register_sampler("dpm++", spacing="logsnr-trailing")
def dpm_solver_step(schedule: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState):
    """One step of DPM-Solver++(2M) in data-prediction form (Lu et al. 2022, arXiv 2211.01095, Algorithm 2).

    From index i (log-SNR lambda_s) to the next, less noisy one (lambda_t), with h = lambda_t - lambda_s:
        D = x0_hat                                      first order: the first step, and the last (to sigma = 0)
        D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev    second order, r = h_prev / h
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
    The step keeps its x0_hat in state.memory for the next one (a multistep solver: one evaluation per step).
    """
    x0_hat = denoise(x_t, i)
    previous, state.memory["x0_hat"] = state.memory.get("x0_hat"), x0_hat
    ab_s, ab_t = float(schedule.alpha_bars[i]), float(schedule.alpha_bars_prev[i])
    if ab_t == 1.0:  # 1. The last step lands on alpha_bar = 1, sigma = 0: the sample is the estimate itself
        return x0_hat
    # 2. alpha, sigma and lambda = log(alpha / sigma) at both ends of the step
    alpha_t, sigma_s, sigma_t = math.sqrt(ab_t), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
    h = _half_log_snr(ab_t) - _half_log_snr(ab_s)
    # 3. The estimate to integrate: x0_hat, or its linear extrapolation from the previous step's
    d = x0_hat
    if previous is not None:
        h_prev = _half_log_snr(ab_s) - _half_log_snr(float(schedule.alpha_bars[i + 1]))
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * previous
    # 4. The exponential-integrator update
    return (sigma_t / sigma_s) * x_t - alpha_t * math.expm1(-h) * d


def _half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) = log(SNR) / 2."""
    return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


# Heun's method (Karras et al. 2022, "EDM") works in the variables of a variance-exploding process: with
# x~ = x / alpha and sigma~ = sigma / alpha, x~_t = x_0 + sigma~ eps, and the probability-flow ODE reads
#     dx~ / dsigma~ = (x~ - x0_hat) / sigma~ = eps_hat          (Karras et al. 2022, arXiv 2206.00364, eq. (3)-(4))
# An Euler step of it is the DDIM step (eta = 0); Heun averages the slope at both ends of the step, a second-order
# method that pays a second network evaluation per step.


@register_sampler("heun", spacing="logsnr-trailing", evaluations_per_step=2)
def heun_step(schedule: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState):
    """One step of Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    In x~ = x / alpha the slope is d = eps_hat; from sigma~ to sigma~' (h = sigma~' - sigma~):
        x~_euler = x~ + h d                         the Euler step: DDIM's, alpha' x0_hat + sigma' eps_hat
        x~'      = x~ + h (d + d') / 2 = x~_euler + h (d' - d) / 2,   d' = eps_hat(x_euler) at the next index
    written back in x = alpha x~, where no number grows with sigma~ (x~ reaches 10^4 at pure noise, too large for
    float32 to cancel). The last step (to sigma = 0, where d' is undefined) is Euler; so is the first when the
    evaluation budget E is even: on grid_steps(E) steps, steps 1 .. E - len(schedule) are corrected, spending E.
    """
    ab, ab_prev = float(schedule.alpha_bars[i]), float(schedule.alpha_bars_prev[i])
    alpha, sigma, alpha_prev, sigma_prev = math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_prev), math.sqrt(1 - ab_prev)
    x0_hat = denoise(x_t, i)
    eps_hat = (x_t - alpha * x0_hat) / sigma  # the slope d at the start of the step
    euler = alpha_prev * x0_hat + sigma_prev * eps_hat
    if i == 0 or i > state.evaluations - len(schedule):
        return euler
    eps_next = (euler - alpha_prev * denoise(euler, i - 1)) / sigma_prev  # the slope d' at the end
    return euler + alpha_prev * (sigma / alpha - sigma_prev / alpha_prev) * (eps_hat - eps_next) / 2


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985; White 2016, arXiv 1609.04468).

    Gaussian noise lives near a sphere of radius sqrt(d); a straight line between two draws cuts inside it (the
    midpoint has norm ~0.71 sqrt(d), not noise the model has seen), while the great circle keeps the norm.
    """
    flat_a, flat_b = a.flatten(), b.flatten()
    cos = float(torch.dot(flat_a, flat_b) / (flat_a.norm() * flat_b.norm()))
    angle = math.acos(max(-1.0, min(1.0, cos)))
    if angle < 1e-6:
        return (1 - weight) * a + weight * b
    return (math.sin((1 - weight) * angle) * a + math.sin(weight * angle) * b) / math.sin(angle)


def plot_validity_against_evaluations(rows: Sequence[dict], title: str = "Validity against network evaluations"):
    """One line per sampler: the valid share (y) at each number of network evaluations (x, log scale).

    rows: dicts with "sampler", "steps" and "valid" (as written by benchmarks/samplers.py).
    """
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    for name in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["steps"], r["valid"]) for r in rows if r["sampler"] == name)
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("valid samples (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# ------------------------------------------------------------------------------------------
# 11. Asking for a shape: requests and classifier-free guidance
# ------------------------------------------------------------------------------------------
#
# A conditional model learns p(x | y) for requests y (class, centre, size), and p(x) too, because training hides each
# field at random (Condition.dropped). Bayes' rule splits the conditional score:
#     grad log p(x | y) = grad log p(x) + grad log p(y | x),
# so (cond - uncond) is the gradient of an implicit classifier log p(y | x). Classifier-free guidance (Ho & Salimans
# 2022, arXiv 2207.12598) scales it: out = uncond + s (cond - uncond), a sample from p(x) p(y | x)^s. s = 1 is the
# plain conditional model, s = 0 the unconditional one, s > 1 trades diversity for faithfulness to the request.
# Guiding the v output is the same as guiding eps or x0_hat: at a given x_t each is an affine function of the
# network output with the same coefficients (eps = sigma x_t + alpha v, x0_hat = alpha x_t - sigma v), and an affine
# map commutes with u + s (c - u). `guided_output` (with the sampling loop, section 7) computes it.
#
# A prompt (Prompt, section 3) is asked the same way: training leaves each part of a caption out at random, the empty
# prompt is the unconditional model, and guidance extrapolates from it. ModelConfig.conditioning chooses what a
# model reads; a request given to a prompt model is written as a prompt (prompt_of_request), so both ways in share
# one mechanism, and `evaluate_prompts` scores samples word by word as `evaluate_requests` scores them field by field.


def request(n: int, *values: object, **asked: object) -> Condition:
    """n copies of one request; a field not asked (or None) is left out.

    request(n, "circle", 25, (30, 40)) asks, in the order of REQUEST_ORDER, for a class name, a size and a centre in
    pixels; request(n, shape="circle", center=(30, 40)) names them (RequestField.argument). Each value must be one the
    data can show (RequestField.check): a class of SHAPES, a size within SIZE_RANGE, and a centre that keeps the shape
    (of that size, or of the smallest size when none is given) MARGIN pixels inside the frame.
    """
    _check_positive_int("n", n)
    if len(values) > len(REQUEST_ORDER):
        raise TypeError(f"request() takes at most {len(REQUEST_ORDER)} values after n, got {len(values)}")
    by_name = dict(zip(REQUEST_ORDER, values))
    for argument, value in asked.items():
        name = next((f.name for f in REQUEST_FIELDS if f.argument == argument), None)
        if name is None or name in by_name:
            problem = "an unknown field" if name is None else "given twice"
            raise TypeError(f"request(): {argument!r} is {problem}")
        by_name[name] = value
    by_name = {name: value for name, value in by_name.items() if value is not None}
    return Condition(
        *(
            torch.tensor([f.check(by_name[f.name], by_name)] * n, dtype=f.dtype) if f.name in by_name else f.empty(n)
            for f in REQUEST_FIELDS
        )
    )


@dataclass
class RequestScore:
    """How one sample obeys its request: valid, and per field asked of a valid sample, its RequestField.score (right
    or wrong for the class; an error in px for the centre and the size, against the request drawn by draw_shape)."""

    valid: bool
    scores: dict[str, object]  # by field name; the fields not asked, and all of an invalid sample's, are left out

    @property
    def matches(self) -> bool:
        """Valid, and right in every categorical field asked (the class)."""
        return self.valid and all(score is not False for score in self.scores.values())


def score_requests(samples: torch.Tensor | np.ndarray, condition: Condition) -> list[RequestScore]:
    """Each sample against its request, read by the same reader as evaluate_samples.

    Each request is drawn with draw_shape (a field not asked takes the sample's own value) and read back, so a real
    image scores 0 px against its own request.
    """
    images = _as_uint8_images(samples)
    if len(condition) != len(images):
        raise ValueError(f"the condition holds {len(condition)} requests for {len(images)} samples")
    given = {name: mask.cpu().numpy() for name, mask in condition.given().items()}
    values = {name: tensor.cpu().numpy() for name, tensor in condition.values.items()}
    scores = []
    for k, reading in enumerate(read_shape(image) for image in images):
        if not reading.valid:
            scores.append(RequestScore(False, {}))
            continue
        asked = {f.name: values[f.name][k] for f in REQUEST_FIELDS if given[f.name][k]}
        reference = _drawn_request(asked, reading)
        scores.append(
            RequestScore(
                True, {f.name: f.score(f.read(reading), f.read(reference)) for f in REQUEST_FIELDS if f.name in asked}
            )
        )
    return scores


def evaluate_requests(samples: torch.Tensor | np.ndarray, condition: Condition) -> dict[str, float]:
    """How well samples obey their requests (score_requests), over the batch.

    valid           share of samples with one valid shape
    matches         share of all samples that are valid and show the asked class (if one was asked)
    class_accuracy  among valid samples that were asked for a class, the share that show it
    center_error    mean distance (px) between a valid sample's centre and the asked one's
    size_error      mean absolute size error (px) of the valid samples
    (one RequestField.metric per field). Real data scores 100 % and 0 px; NaN where nothing was asked or nothing is
    valid.
    """
    scores = score_requests(samples, condition)

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else math.nan

    metrics = {"n": len(scores), "valid": mean([s.valid for s in scores]), "matches": mean([s.matches for s in scores])}
    for f in REQUEST_FIELDS:
        metrics[f.metric] = mean([s.scores[f.name] for s in scores if f.name in s.scores])
    return metrics


def _drawn_request(asked: dict[str, object], reading: ShapeReading) -> ShapeReading:
    """The reading of the request drawn as the data would be; a field not asked takes the sample's own value. Its
    class is the asked one: the score compares the sample's class with it, not with the reader's view of it."""
    label = int(asked["class"]) if "class" in asked else reading.label
    center = asked["center"] if "center" in asked else reading.center
    shape = SHAPES[label]
    size = shape.drawable_size(asked["size"] if "size" in asked else reading.size)
    anchor = (int(round(center[0] - center_offset(size))), int(round(center[1] - center_offset(size))))
    return dataclasses.replace(read_shape(draw_shape(label, anchor, size)), label=label)


def describe_request(condition: Condition, k: int = 0) -> str:
    """Request k in words, e.g. "circle, 25 px, at (30, 40)", or "anything"."""
    given = condition.given()
    fields = {f.name: f for f in REQUEST_FIELDS}
    words = [fields[name].words(condition.values[name][k]) for name in REQUEST_ORDER if bool(given[name][k])]
    return ", ".join(words) or "anything"


def spread(samples: torch.Tensor | np.ndarray, condition: Condition | None = None) -> dict[str, float]:
    """Diversity: the standard deviation (px) of the sizes and of the centres (x and y averaged) of the valid
    samples, pooled within each asked class (so the mix of circles and squares does not count as spread)."""
    readings = [read_shape(image) for image in _as_uint8_images(samples)]
    labels = condition.labels.cpu().numpy() if condition is not None else np.full(len(readings), -1)
    groups = []
    for label in np.unique(labels):
        valid = [r for r, asked in zip(readings, labels) if asked == label and r.valid]
        groups.append(np.array([[r.size, *r.center] for r in valid]).reshape(-1, 3))
    center = (_pooled_sd([g[:, 1] for g in groups]) + _pooled_sd([g[:, 2] for g in groups])) / 2
    return {"size_sd": _pooled_sd([g[:, 0] for g in groups]), "center_sd": center}


def _pooled_sd(groups: list[np.ndarray]) -> float:
    """The pooled standard deviation of groups of values (those with two or more); NaN if there are none."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return math.nan
    squares = sum((len(g) - 1) * float(np.var(g, ddof=1)) for g in groups)
    return math.sqrt(squares / sum(len(g) - 1 for g in groups))


def plot_guidance_sweep(rows: Sequence[dict]):
    """Accuracy, validity and diversity against the guidance scale, one line per request kind.

    rows: dicts with "kind", "scale", and the keys of evaluate_requests and spread.
    """
    panels = [
        ("share", [("class_accuracy", "-", "class accuracy"), ("matches", "--", "matches")]),
        ("valid share", [("valid", "-", "")]),
        ("spread of valid samples (px)", [("size_sd", "-", "size"), ("center_sd", "--", "centre")]),
    ]
    fig = _figure(13, 3.6)
    for ax, (ylabel, metrics) in zip(fig.subplots(1, len(panels)), panels):
        for k, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
            mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["scale"])
            for key, style, name in metrics:
                values = [math.nan if r.get(key) is None else r[key] for r in mine]
                if not all(math.isnan(v) for v in values):
                    label = f"{kind}, {name}" if name else kind
                    ax.plot([r["scale"] for r in mine], values, style, marker="o", ms=3, color=f"C{k}", label=label)
        ax.set_xlabel("guidance scale s")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("What the guidance scale does")
    return fig


def request_matches(samples: torch.Tensor, condition: Condition, tolerance_px: float = 3.0) -> list[bool]:
    """For plot_grid's outline: each sample is valid, of the asked class, and within tolerance_px of the asked
    centre and size (the fields that were asked)."""
    return [
        s.matches and not any(score > tolerance_px for score in s.scores.values() if not isinstance(score, bool))
        for s in score_requests(samples, condition)
    ]


# Prompts are scored as requests are, word by word: each kind of word a prompt holds (PROMPT_GROUPS) is checked
# against what the reader sees in the sample. A word is right or wrong (the class, the size word, the half, the
# quadrant, the centre); an exact size or place is an error in pixels against the request drawn as the data would be.
PROMPT_METRICS = {
    "class": "class_accuracy",
    "size word": "size_word_accuracy",
    "size": "size_error",
    "half": "half_accuracy",
    "quadrant": "quadrant_accuracy",
    "centre": "centre_accuracy",
    "place": "center_error",
}


@dataclass
class PromptScore:
    """How one sample obeys its prompt: valid, and per kind of word the prompt holds (PROMPT_METRICS' keys), right
    (bool) or an error in px; an invalid sample's are left out."""

    valid: bool
    scores: dict[str, object]

    @property
    def matches(self) -> bool:
        """Valid, and right in every word that is right or wrong."""
        return self.valid and all(score is not False for score in self.scores.values())


def score_prompts(samples: torch.Tensor | np.ndarray, prompts: str | Sequence[str] | Prompt) -> list[PromptScore]:
    """Each sample against its prompt (one text for all, or one each), read by the same reader as evaluate_samples.
    A real image scores right and 0 px against its own caption."""
    images = _as_uint8_images(samples)
    texts = _prompt_texts(prompts, len(images))
    asks = {text: read_prompt(text) for text in set(texts)}
    return [_prompt_score(read_shape(image), asks[text]) for image, text in zip(images, texts)]


def _prompt_texts(prompts: str | Sequence[str] | Prompt, n: int) -> list[str]:
    texts = [prompts] * n if isinstance(prompts, str) else list(getattr(prompts, "texts", prompts))
    if len(texts) != n:
        raise ValueError(f"{len(texts)} prompts for {n} samples")
    return texts


def _prompt_score(reading: ShapeReading, ask: PromptAsk) -> PromptScore:
    if not reading.valid:
        return PromptScore(False, {})
    scores: dict[str, object] = {}
    if ask.label is not None:
        scores["class"] = reading.label == ask.label
    if ask.size_word is not None:
        scores["size word"] = size_word(drawn_size(reading)) == ask.size_word
    if ask.half is not None:
        scores["half"] = HALVES[ask.half](*reading.center)
    if ask.quadrant is not None:
        scores["quadrant"] = quadrant_of(reading.center) == ask.quadrant
    if ask.centre:
        scores["centre"] = is_centre(reading.center)
    exact = {"class": ask.label, "size": ask.size, "center": ask.center}
    if ask.size is not None or ask.center is not None:
        reference = _drawn_request({k: v for k, v in exact.items() if v is not None}, reading)
        if ask.size is not None:
            scores["size"] = abs(reading.size - reference.size)
        if ask.center is not None:
            scores["place"] = math.dist(reading.center, reference.center)
    return PromptScore(True, scores)


_DRAWN_SIZES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def drawn_size(reading: ShapeReading) -> int:
    """The size a valid shape was most likely drawn at: the one of its class whose drawing reads closest to its
    reading (the reader's size of a small pixel circle is not quite its diameter, and a size word's bounds are
    whole pixels)."""
    shape = SHAPES[reading.label]
    if shape.name not in _DRAWN_SIZES:
        sizes = np.array([s for s in range(3, IMAGE_SIZE - 2 * MARGIN + 1) if shape.drawable_size(s) == s])
        middle = IMAGE_SIZE // 2 - 1
        read = np.array([read_shape(draw_shape(reading.label, (middle, middle), int(s))).size for s in sizes])
        _DRAWN_SIZES[shape.name] = (sizes, read)
    sizes, read = _DRAWN_SIZES[shape.name]
    return int(sizes[np.argmin(np.abs(read - reading.size))])


def evaluate_prompts(samples: torch.Tensor | np.ndarray, prompts: str | Sequence[str] | Prompt) -> dict[str, float]:
    """How well samples obey their prompts (score_prompts), over the batch: per kind of word, the share obeyed.

    valid                share of samples with one valid shape
    matches              share of all samples that are valid and right in every word that is right or wrong
    class_accuracy       among valid samples whose prompt names a class, the share that show it
    size_word_accuracy   ... that say small, medium or large, the share of that size
    size_error           mean error (px) of an exact size ("25 px")
    half_accuracy        ... that name a half (left, right, top, bottom), the share whose centre is in it
    quadrant_accuracy    ... that name a quadrant (top left, ...), the share whose centre is in it
    centre_accuracy      ... that say centre, center or middle, the share within CENTRE_RADIUS px of the frame's
    center_error         mean distance (px) from an exact place ("at 30, 40")
    Real data with its own captions scores 100 % and 0 px; NaN where no prompt holds that kind of word.
    """
    scores = score_prompts(samples, prompts)

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else math.nan

    metrics = {"n": len(scores), "valid": mean([s.valid for s in scores]), "matches": mean([s.matches for s in scores])}
    for kind, metric in PROMPT_METRICS.items():
        metrics[metric] = mean([s.scores[kind] for s in scores if kind in s.scores])
    return metrics


# (prompt, in a held-out phrasing): every kind of word, in every training template and held-out one; the pictures of
# the notebook's section 14 and of benchmarks/prompts.py
EXAMPLE_PROMPTS = (
    ("a small circle in the top left corner", False),
    ("large square, bottom right", False),
    ("in the middle a medium circle", False),
    ("a square, small and near the bottom of the frame", False),
    ("circle 25 px wide at 20, 42", False),
    ("a circle on the right, 30 pixels wide", True),
    ("a 20 px square in the top right corner", True),
    ("bottom left, the circle, large", True),
)
ATTENTION_WORDS = {  # prompt: the words whose cross-attention maps plot_word_attention shows
    "a small circle in the top left corner": ("small", "circle", "top", "left"),
    "large square, bottom right": ("large", "square", "bottom", "right"),
}


def plot_prompt_grid(images: torch.Tensor, prompts: Sequence[str], held_out: Sequence[bool] = (), how: str = ""):
    """A row of samples per prompt (images: the rows one after another); outlined green when the sample is valid and
    obeys every word (score_prompts), red otherwise; a row label ends in * when `held_out` marks its phrasing."""
    if len(prompts) == 0 or len(images) % len(prompts) or len(held_out) > len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: the same number of samples for each")
    columns = len(images) // len(prompts)
    outline = [score.matches for score in score_prompts(images, [text for text in prompts for _ in range(columns)])]
    marks = list(held_out) + [False] * (len(prompts) - len(held_out))
    labels = [f"{text} *" if mark else text for text, mark in zip(prompts, marks)]
    title = f"Prompts{f' ({how})' if how else ''}; * a held-out phrasing; green: obeys every word"
    return plot_grid(images, columns=columns, title=title, outline=outline, row_labels=labels)


# shares of the schedule at which word_attention noises a sample again: the maps of all noise levels, averaged
ATTENTION_TIMES = tuple(float(share) for share in np.linspace(0.05, 0.95, 10))


def word_attention(model: UNet, schedule: NoiseSchedule, image: torch.Tensor, text: str, seed: int = 0):
    """(1 + PROMPT_LENGTH, 64, 64): cross_attention_maps of one sample, noised back (with one noise, from `seed`) to
    each of ATTENTION_TIMES along the schedule, averaged over those times, as Hertz et al. average over the sampling
    steps (arXiv 2208.01626)."""
    device = next(model.parameters()).device
    x0 = image[None].to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    prompt = Prompt.of([text]).to(device)
    maps = []
    for share in ATTENTION_TIMES:
        index = torch.tensor([round(share * (len(schedule) - 1))], device=device)
        x_t = schedule.noised(x0, noise, index) * float(schedule.input_scales[index])  # the network's input
        t = schedule.timesteps.to(device)[index]
        maps.append(cross_attention_maps(model, x_t.float(), t, prompt)[0].cpu())
    return torch.stack(maps).mean(0)


def plot_word_attention(
    model: UNet, schedule: NoiseSchedule, images: torch.Tensor, words: dict[str, Sequence[str]], seed: int = 0
):
    """Per prompt of `words` (its sample in `images`, in the same order), the sample and the word_attention map of
    each word named: which pixels read which word. The shape drawn is outlined when it is valid; each map has its
    own colour scale, its largest share in the title."""
    texts = list(words)
    columns = 1 + max(len(named) for named in words.values())
    fig = _figure(1.6 * columns, 1.9 * len(texts) + 0.4)
    axes = fig.subplots(len(texts), columns, squeeze=False)
    for row, (text, image) in enumerate(zip(texts, images)):
        maps, tokens = word_attention(model, schedule, image, text, seed), prompt_token_names(text)
        valid = read_shape(model_to_uint8(image[None])[0]).valid
        _show(axes[row, 0], image, textwrap.fill(f'"{text}"', 22))
        for ax in axes[row, 1:]:
            ax.axis("off")
        for ax, word in zip(axes[row, 1:], words[text]):
            attention = maps[1 + tokens.index(word)].numpy()  # index 0 is the start vector
            ax.axis("on")
            ax.imshow(attention, cmap="magma", vmin=0, vmax=max(float(attention.max()), 1e-8))
            if valid:
                ax.contour(image.squeeze().numpy() > 0, levels=[0.5], colors="white", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{word} (max {attention.max():.2f})", fontsize=8)
    fig.suptitle("Which pixels read which word: cross-attention, averaged over layers, heads and noise levels")
    return fig


# ------------------------------------------------------------------------------------------
# 12. Editing: from a sketch, around a mask, back to the noise (the notebook's section 15)
# ------------------------------------------------------------------------------------------
#
# A trained model edits images with no new training, through the same sampling loop (section 7):
# - SDEdit (Meng et al. 2021, arXiv 2108.01073): noise an image to an intermediate time with q(x_t | x_0) and denoise
#   it from there. Noise washes out the details (a wobbly stroke, a wrong aspect) but not the layout, so the sample
#   keeps what the image says at that scale and the model redraws the rest as data. The strength, the share of the
#   time span to start from, trades faithfulness (low) for realism (high); strength 1 is plain sampling.
# - Inpainting by replacement: after every step, the known pixels are overwritten by the original noised to the new
#   time, so the model only ever fills in the unknown ones. RePaint (Lugmayr et al. 2022, arXiv 2201.09865) adds
#   resampling: the replaced x_{t-1} is an unlikely mix of two halves that never saw each other, so it is pushed back
#   to x_t with the one-step forward process q(x_t | x_{t-1}) and denoised again, r times, letting the two agree.
# - DDIM inversion (Song et al. 2021, arXiv 2010.02502, section 4.3; Dhariwal & Nichol 2021, arXiv 2105.05233): the
#   deterministic sampler is an ODE solver (section 10), so it runs backwards too, from an image to the noise that
#   the forward ODE would take to it; decoding that noise with DDIM gives the image back, up to the solver's error.

# The command line's SDEdit strength for a sketch: the middle of the plateau where the most edits are valid, of the
# sketch's class and within 2 px of its centre and size (0.4-0.6: 30-31 %; RESULTS.md, "Editing"). No strength gives
# both realism and faithfulness here: validity rises with the strength as the class and place drift away.
DEFAULT_STRENGTH = 0.5
DEFAULT_RESAMPLE = 5  # RePaint's resamplings per step for `inpaint` (1: plain replacement)


class Edit:
    """What turns `sample` into an edit of given images: where it starts, and which pixels every step keeps.

    images    (N, 1, 64, 64) in [-1, 1]: the sketches to clean up, or the images to complete
    strength  in (0, 1]: start at the grid index whose time is nearest strength times the grid's last; at the last
              index sampling starts from its own pure noise x_T, as `sample` does, so strength 1 is plain sampling
    mask      (N or 1, 1, 64, 64) bool, True at the pixels to keep; None keeps none (SDEdit)
    resample  RePaint's r: each step is taken r times, jumping back with q(x_i | x_{i-1}) in between; 1 is plain
              replacement
    """

    def __init__(
        self, images: torch.Tensor, strength: float = 1.0, mask: torch.Tensor | None = None, resample: int = 1
    ) -> None:
        validate_images(images)
        _check_strength(strength)
        _check_positive_int("resample", resample)
        self.images, self.strength, self.resample = images, float(strength), resample
        self.mask = None if mask is None else _checked_mask(mask, len(images))

    def check(self, n: int) -> None:
        if len(self.images) != n:
            raise ValueError(f"the edit holds {len(self.images)} images for {n} samples")

    def start_index(self, spaced: NoiseSchedule) -> int:
        """The grid index to start from: its time is the nearest to strength times the grid's last."""
        times = spaced.timesteps.double()
        return int((times - self.strength * times[-1]).abs().argmin())

    def grid(self, spaced: NoiseSchedule) -> NoiseSchedule:
        """The sampler's grid cut at the start: NoiseSchedule.at keeps alpha_bar, so its last index is the start."""
        top = self.start_index(spaced)
        return spaced if top == len(spaced) - 1 else spaced.at(torch.arange(top + 1))

    def evaluations(self, method: Sampler, spaced: NoiseSchedule, steps: int) -> int:
        """Network evaluations per image on the cut grid: each step but the last taken `resample` times."""
        grid = self.grid(spaced)
        return max(1, round(steps / len(spaced) * ((len(grid) - 1) * self.resample + 1)))

    def start(self, x_T: torch.Tensor, chunk: slice, grid: NoiseSchedule) -> torch.Tensor:
        """x at the grid's last index: x_T itself at the top of the full grid, else the images noised there by
        q(x_t | x_0) with x_T as the noise (so the same seed means the same noise at every strength)."""
        top = len(grid) - 1
        if self.start_index(grid) == top and self.strength == 1.0:
            return x_T
        images = self.images[chunk].to(x_T.device, x_T.dtype)
        return grid.noised(images, x_T, torch.full((len(x_T),), top, device=x_T.device))

    def sampler(self, method: Sampler, chunk: slice, generators: list[torch.Generator]) -> Sampler:
        """The sampler itself, or (with a mask) its step wrapped to keep the known pixels and resample."""
        if self.mask is None:
            return method
        device = generators[0].device
        known = self.images[chunk].to(device)
        keep = self.mask[chunk].to(device)
        noise = _noise_per_image(generators, device, 1 << 30)  # drawn as the steps ask
        step = _keeping_step(method.step, known, keep, lambda: next(noise), self.resample)
        return dataclasses.replace(method, step=step)


def _keeping_step(inner: Callable, known: torch.Tensor, keep: torch.Tensor, draw: Callable, resample: int) -> Callable:
    """inner's step, then the known pixels replaced by the original noised to the new index (the clean original
    after the last step, so they come out bit for bit); with resample r > 1, RePaint's loop (Algorithm 1): r times,
    step down and replace, then (but the last time) jump back up with q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1},
    beta_i I), the grid's own one-step forward process."""

    def replaced(grid: NoiseSchedule, x: torch.Tensor, index: int) -> torch.Tensor:
        if index < 0:
            return torch.where(keep, known, x)
        noised = grid.noised(known, draw(), torch.full((len(x),), index, device=x.device))
        return torch.where(keep, noised, x)

    def step(grid: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState) -> torch.Tensor:
        memory = dict(state.memory)  # a multistep solver's memory as it was before this step, for every retry
        for attempt in range(resample if i > 0 else 1):
            state.memory = dict(memory)
            x_prev = replaced(grid, inner(grid, i, x_t, denoise, state), i - 1)
            if attempt == resample - 1 or i == 0:
                return x_prev
            beta = float(grid.betas[i])
            x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * draw()
        return x_prev

    return step


def _check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1] (1: plain sampling from pure noise), got {strength}")


def _checked_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """mask as (N, 1, 64, 64) bool, or a ValueError; one that keeps every pixel or none of an image is refused."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True: keep the pixel), got {getattr(mask, 'dtype', mask)!r}")
    if mask.ndim != 4 or tuple(mask.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE) or len(mask) not in (1, n):
        raise ValueError(
            f"mask must have shape ({n} or 1, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) like the images, got {tuple(mask.shape)}"
        )
    kept = mask.flatten(1).sum(1)
    for k, count in enumerate(kept.tolist()):
        which = f"mask {k}" if len(mask) > 1 else "the mask"
        if count == IMAGE_SIZE * IMAGE_SIZE:
            raise ValueError(f"{which} keeps every pixel: there is nothing to inpaint")
        if count == 0:
            raise ValueError(f"{which} keeps no pixel: that is sampling, not inpainting")
    return mask.expand(n, -1, -1, -1)


def edit(
    model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, strength: float = DEFAULT_STRENGTH, **options
) -> SampleResult:
    """SDEdit: each image noised to `strength` of the grid's time span, then denoised by `sample` from there.

    options are sample's (steps, sampler, seed, condition, guidance, ...): with a request, the sketch is steered
    towards it. `steps` sets the full grid; an edit walks its first strength share of it (about strength * steps
    network evaluations). Strength 1 is `sample` itself, with the same noise.
    """
    return sample(model, schedule, len(images), editing=Edit(images, strength), **options)


def inpaint(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    mask: torch.Tensor,
    resample: int = DEFAULT_RESAMPLE,
    strength: float = 1.0,
    **options,
) -> SampleResult:
    """Fill the pixels where mask is False, keeping those where it is True bit for bit (RePaint, resample r).

    resample=1 is plain replacement; r > 1 spends about r times the network evaluations. strength < 1 starts from
    the image noised part of the way (the hidden pixels then start from what the image holds there). options are
    sample's.
    """
    return sample(model, schedule, len(images), editing=Edit(images, strength, mask, resample), **options)


def ddim_inversion_step(schedule: NoiseSchedule, i: int, x: torch.Tensor, denoise: Denoiser) -> torch.Tensor:
    """One DDIM step run backwards, from index i - 1 (the clean image when i = 0) up to index i.

    Decoding from i to i - 1 needs eps_hat at x_i, which is not known yet; inversion takes it at x_{i-1} instead
    (the ODE's slope barely changes over a step): x_i = sqrt(ab_i) x0_hat + sqrt(1 - ab_i) eps_hat. From the clean
    image, x0_hat is the image itself and eps_hat the network's there at index 0.
    """
    at = max(i - 1, 0)
    ab, ab_at = float(schedule.alpha_bars[i]), float(schedule.alpha_bars[at])
    estimate = denoise(x, at)
    eps_hat = (x - math.sqrt(ab_at) * estimate) / math.sqrt(1 - ab_at)
    x0_hat = x if i == 0 else estimate
    return math.sqrt(ab) * x0_hat + math.sqrt(1 - ab) * eps_hat


@torch.no_grad()
def invert(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    steps: int = 50,
    condition: Condition | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    prediction: str | None = None,
    spacing: str = "time",
    batch_size: int = 256,
    precision: str | None = None,
) -> torch.Tensor:
    """DDIM inversion: the noise x_T (N, 1, 64, 64) that the deterministic DDIM sampler of `steps` steps decodes
    back into each image, `sample(..., sampler="ddim", steps=steps, spacing=spacing, initial_noise=x_T)`.

    One network evaluation per step, as decoding. The round trip is exact for a network whose eps_hat does not
    change along the path, and close for a good one at enough steps (benchmarks/editing.py measures it).
    """
    validate_images(images)
    n = len(images)
    _, _, prediction = _check_sample_args(model, schedule, n, steps, "ddim", None, prediction, batch_size)
    _check_guidance(model, condition, n, guidance)
    runtime = setup(next(model.parameters()).device, precision)
    grid = schedule.respaced(steps, spacing)
    latents = torch.empty_like(images, dtype=torch.float32, device="cpu")
    was_training = model.training
    model.eval()
    try:
        with runtime.compute():
            for start in range(0, n, batch_size):
                chunk = slice(start, min(n, start + batch_size))
                chunk_condition = condition.select(chunk).to(runtime.device) if condition else None
                denoise = make_denoiser(runtime_output(model, runtime, chunk_condition, guidance), grid, prediction)
                x = images[chunk].to(runtime.device, torch.float32)
                for i in range(len(grid)):  # from the clean image up to the noisiest index
                    x = ddim_inversion_step(grid, i, x, denoise)
                latents[chunk] = x.cpu()
    finally:
        model.train(was_training)
    return latents


# Sketches and masks to edit: what a person would draw, or hide, with the shape it stands for known, so an edit can
# be scored against the intention (class, centre, size) and not only for looking clean.

SKETCH_STYLES = ("fill", "outline", "hatch")
MASK_KINDS = ("half", "box", "strokes")


def make_sketches(n: int, seed: int | Sequence[int] = 0) -> ShapeBatch:
    """n rough, hand-drawn-like shapes: make_shapes(n, seed)'s classes, centres and sizes (the intention, in the
    ShapeBatch) drawn with a wobbly outline, a slightly wrong aspect and tilt, in one of SKETCH_STYLES: filled,
    an outline with gaps, or an outline with hatching. Reproducible from the seed."""
    intended = make_shapes(n, seed)
    rng = np.random.default_rng([*np.ravel(seed).tolist(), 0x5EED])
    images = np.stack(
        [
            _draw_sketch(_sketch_outline(int(label), center, float(size), rng), rng)
            for label, center, size in zip(intended.labels, intended.centers, intended.sizes)
        ]
    )
    return dataclasses.replace(intended, images=uint8_to_model(images))


def _sketch_outline(label: int, center: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """(M, 2) points of a wobbly closed outline around the intended shape: a wrong aspect of up to 12 %, a tilt of
    up to 7 degrees, a slow radial wobble and a jitter of half a pixel."""
    if SHAPES[label].name == "circle":
        theta = np.linspace(0, 2 * np.pi, 36, endpoint=False)
        unit = np.stack([np.cos(theta), np.sin(theta)], 1)
    else:
        u = np.linspace(-1, 1, 9)[:-1]
        sides = [(u, -np.ones(8)), (np.ones(8), u), (-u, np.ones(8)), (-np.ones(8), -u)]
        unit = np.concatenate([np.stack(side, 1) for side in sides])
    phase = np.arctan2(unit[:, 1], unit[:, 0])
    wobble = 1 + 0.04 * np.sin(2 * phase + rng.uniform(0, 2 * np.pi)) + 0.03 * np.sin(3 * phase + rng.uniform(0, 6))
    aspect, tilt = rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)
    points = unit * wobble[:, None] * (size / 2) * np.array([1 + aspect, 1 - aspect])
    rotation = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return points @ rotation.T + center + rng.normal(0, 0.5, points.shape)


def _draw_sketch(outline: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image of an outline in a random SKETCH_STYLES style, anti-aliased as a pen would be."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    fixed = np.round(outline * 16).astype(np.int32)  # OpenCV's sub-pixel points: 4 fractional bits
    style = SKETCH_STYLES[rng.integers(len(SKETCH_STYLES))]
    ink = int(rng.integers(200, 256))
    if style == "fill":
        cv2.fillPoly(image, [fixed], ink, lineType=cv2.LINE_AA, shift=4)
        return image
    if style == "hatch":
        inside = np.zeros_like(image)
        cv2.fillPoly(inside, [fixed], 255, lineType=cv2.LINE_8, shift=4)
        spacing, slope = int(rng.integers(3, 5)), rng.choice([-1, 1])
        for offset in range(-IMAGE_SIZE, 2 * IMAGE_SIZE, spacing):
            cv2.line(image, (offset, 0), (offset + slope * IMAGE_SIZE, IMAGE_SIZE), ink, 1, cv2.LINE_AA)
        image[inside == 0] = 0
        cv2.polylines(image, [fixed], True, ink, 1, cv2.LINE_AA, shift=4)
        return image
    gaps = set(rng.choice(len(fixed), size=int(rng.integers(1, 4)), replace=False).tolist())  # pen lifted there
    thickness = int(rng.integers(1, 3))
    for k in range(len(fixed)):
        if k not in gaps:
            cv2.line(image, tuple(fixed[k]), tuple(fixed[(k + 1) % len(fixed)]), ink, thickness, cv2.LINE_AA, 4)
    return image


def make_masks(batch: ShapeBatch, kind: str = "half", seed: int = 0) -> torch.Tensor:
    """(N, 1, 64, 64) bool masks, True at the pixels to keep, hiding part of each shape of `batch`:
    "half"     the frame's half beyond a line through the shape's centre (left, right, top or bottom)
    "box"      a box 60-90 % of the shape's size across, near its centre
    "strokes"  three to five thick random strokes through the shape's box
    Each keeps some pixels and hides some, so every mask is a real inpainting task."""
    _check_choice("kind", kind, MASK_KINDS)
    rng = np.random.default_rng([seed, MASK_KINDS.index(kind)])
    masks = np.ones((len(batch), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for mask, (cx, cy), size in zip(masks, batch.centers, batch.sizes):
        if kind == "half":
            side = int(rng.integers(4))
            coordinate, middle = (_GRID_X, cx) if side < 2 else (_GRID_Y, cy)
            mask[(coordinate >= middle) if side % 2 == 0 else (coordinate < middle)] = 0
        elif kind == "box":
            half = rng.uniform(0.3, 0.45) * size
            x, y = cx + rng.uniform(-size / 3, size / 3), cy + rng.uniform(-size / 3, size / 3)
            cv2.rectangle(mask, (int(x - half), int(y - half)), (int(x + half), int(y + half)), 0, -1)
        else:
            for _ in range(int(rng.integers(3, 6))):
                a, b = rng.uniform(-size / 2, size / 2, (2, 2)) + (cx, cy)
                cv2.line(mask, tuple(a.astype(int)), tuple(b.astype(int)), 0, int(rng.integers(3, 7)))
    return torch.from_numpy(masks.astype(bool)).unsqueeze(1)


# ------------------------------------------------------------------------------------------
# 13. Fewer steps by tuning: a student that samples in one to four network evaluations
# ------------------------------------------------------------------------------------------
#
# Solvers (section 10) need about ten evaluations for clean shapes: below that, the curvature of the ODE's paths
# defeats any step rule. A trained model can instead be tuned into one whose few steps are right by construction.
# The teacher is frozen inside a Distiller, a Trainer whose objective is the method's; the student is a U-Net of the
# same configuration started from the teacher's EMA weights, and the Trainer's loop, plan, checkpoints and resume
# run it unchanged. Three methods, each recorded in the checkpoint with the sampler its student is made for:
# - consistency (Song et al. 2023, arXiv 2303.01469; easy consistency tuning, Geng et al. 2024, arXiv 2406.14548):
#   the student's estimate f(x_t, t) of x_0 is taught to equal the stop-gradient estimate f(x_r, r) of a target
#   network, an EMA of the student (Song et al.'s; the student itself, as in ECT, let a DDPM teacher's student
#   collapse), one teacher ODE step (DDIM) closer to the data. f is the identity at the clean end, so agreement
#   there carries the data up the whole path, and f(x_T, T) becomes a sample. The step t -> r shrinks over the
#   run, from a grid of teacher_steps / 8 steps to one of teacher_steps, as ECT anneals r -> t: coarse steps spread
#   the clean end fast, fine ones make it exact. A perfect teacher puts x_r on the same noise as x_t, which is
#   ECT's own pair. Sampled by the "consistency" sampler: x_0 = f(x_T, T); with more steps, noised again to a lower
#   time and denoised again (Song et al. 2023, Algorithm 1).
# - progressive (Salimans & Ho 2022, arXiv 2202.00512): one DDIM step of the student matches two of the teacher;
#   then the student becomes the teacher and the steps halve again, teacher_steps / 2 -> ... -> 1, one round each
#   for an equal share of the plan.
# - reflow (Liu et al. 2022, arXiv 2209.03003): a flow teacher's ODE couples each noise with an image; the
#   student's flow, trained on those pairs, has straight paths, and one or two Euler (DDIM) steps follow them.
# Conditioning carries over: teacher and student read the same request, hidden at random as in training, so the
# student keeps its conditional and its unconditional output, and classifier-free guidance (section 11) combines
# them as before.

DISTILL_METHODS = ("consistency", "progressive", "reflow")
DEFAULT_DISTILL_METHOD = "consistency"  # benchmarks/distill.py measures the three

# Per method: the sampler and grid its student is made for, its evaluations by default, the teacher's steps it
# starts from, and the learning-rate schedule (progressive trains a new target each round: a constant rate).
_METHOD_DEFAULTS = {
    "consistency": {
        "sampler": "consistency",
        "spacing": "time-trailing",
        "steps": 2,
        "teacher_steps": 64,
        "target_decay": 0.95,
    },
    "progressive": {"sampler": "ddim", "spacing": "time-trailing", "steps": 4, "teacher_steps": 8},
    "reflow": {"sampler": "ddim", "spacing": "time-trailing", "steps": 2, "teacher_steps": 8},
}


@dataclass
class Distillation:
    """What a tuned checkpoint is and how its student samples (saved in the checkpoint).

    `steps` is the student's network evaluations by default (progressive: those of the current round's student);
    `teacher_steps` is, for consistency, the finest grid of its curriculum; for progressive, the teacher's DDIM steps
    of the first round (a power of two); for reflow, the teacher's solver steps per pair. `target_decay` (consistency
    only): the student's estimate at the nearer time, its target, comes from an average of the student, an EMA with
    this decay (Song et al. 2023's target network); None: from the student itself under stop-gradient, which let a
    DDPM teacher's student collapse to gray (RESULTS.md, "Distillation").
    """

    method: str
    sampler: str  # the SAMPLERS entry `sample` uses for this student by default
    spacing: str  # the grid it samples on (SPACINGS)
    steps: int
    teacher_steps: int
    teacher: str = ""  # where the teacher came from, for the record
    target_decay: float | None = None  # consistency: the target network's EMA decay (None: the online student)

    def __post_init__(self) -> None:
        _check_choice("method", self.method, DISTILL_METHODS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("spacing", self.spacing, SPACINGS)
        _check_positive_int("steps", self.steps)
        _check_positive_int("teacher_steps", self.teacher_steps)
        if self.target_decay is not None and (self.method != "consistency" or not 0 <= self.target_decay < 1):
            raise ValueError(f"target_decay is a consistency target's EMA decay in [0, 1), got {self.target_decay}")
        if self.method == "progressive" and (self.teacher_steps < 2 or self.teacher_steps & (self.teacher_steps - 1)):
            raise ValueError(
                f"progressive distillation halves the steps: teacher_steps must be 2, 4, 8, ..., got "
                f"{self.teacher_steps}"
            )

    @classmethod
    def of(cls, method: str = DEFAULT_DISTILL_METHOD, teacher: str = "", **changes: object) -> Distillation:
        """The record of a method with its defaults (any of which `changes` replaces)."""
        _check_choice("method", method, DISTILL_METHODS)
        fields = {**_METHOD_DEFAULTS[method], **changes}
        if method == "progressive" and "steps" not in changes:
            fields["steps"] = fields["teacher_steps"] // 2
        return cls(method=method, teacher=teacher, **fields)

    @property
    def rounds(self) -> int:
        """Progressive distillation's rounds: teacher_steps halved down to one step."""
        return int(math.log2(self.teacher_steps)) if self.method == "progressive" else 1


def distillation_train_config(teacher: TrainConfig, method: str, seed: int | None = None) -> TrainConfig:
    """The teacher's training settings, tuned for tuning: a quarter of its peak learning rate (the student starts
    trained, and large steps would undo that) after a short warm-up; progressive at a constant rate (each round is
    a new target). Choices by reasoning, for benchmarks/distill.py to measure."""
    _check_choice("method", method, DISTILL_METHODS)
    schedule = "constant" if method == "progressive" else teacher.lr_schedule
    changes = {"lr": teacher.lr / 4, "warmup_steps": min(teacher.warmup_steps, 50), "lr_schedule": schedule}
    if seed is not None:
        changes["seed"] = seed
    return dataclasses.replace(teacher, **changes)


def network_x0(
    model: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    x: torch.Tensor,
    index: torch.Tensor,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """The network's estimate of x_0 for x at schedule indices `index` (one per image), with gradients: the
    per-image form of make_denoiser's, unclipped."""
    scale = schedule.gather(schedule.input_scales, index, x)
    time = schedule.timesteps.to(x.device)[index]
    time = time.float() if time.is_floating_point() else time
    output = model(x * scale, time) if condition is None else model(x * scale, time, condition)
    return schedule.predict_x0(prediction, x, output.float(), index)


def _alpha_sigma(schedule: NoiseSchedule, index: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at each index, (N, 1, 1, 1); index -1 is the clean end, alpha = 1 and sigma = 0."""
    clean = (index < 0).view(-1, 1, 1, 1)
    safe = index.clamp(min=0)
    alpha = schedule.gather(schedule.sqrt_alpha_bars, safe, like)
    sigma = schedule.gather(schedule.sqrt_one_minus_alpha_bars, safe, like)
    return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)


def _ddim_jump(x: torch.Tensor, x0_hat: torch.Tensor, start: tuple, end: tuple) -> torch.Tensor:
    """The deterministic DDIM step (eta = 0) from (alpha, sigma) = start to end: keep x's implied noise, point to
    x0_hat (section 7)."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = start, end
    eps_hat = (x - alpha_s * x0_hat) / sigma_s
    return alpha_t * x0_hat + sigma_t * eps_hat


def trailing_grid(schedule: NoiseSchedule, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The indices of the "time-trailing" grid of `steps` steps (its noisiest is T-1): the grid the students
    sample on, and so the times they train at."""
    return SPACINGS["time-trailing"](schedule, steps).to(device)


def consistency_grid(distillation: Distillation, progress: float) -> int:
    """The consistency curriculum: the steps of the grid whose neighbours are paired, growing geometrically from
    teacher_steps / 8 to teacher_steps over the plan (ECT's r -> t, Geng et al. 2024, section 3)."""
    end = distillation.teacher_steps
    start = max(1, end // 8)
    return round(start * (end / start) ** min(1.0, max(0.0, progress)))


@torch.no_grad()
def consistency_target(
    target_network: nn.Module,
    teacher: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """What f(x_t, t) learns: the clipped estimate f(x_r, r) of `target_network` (an average of the student, or the
    student itself), with x_r one teacher DDIM step from x_t to r (r = -1: the clean end, where f is the identity,
    so the target is the teacher's x_0 estimate)."""
    teacher_x0 = network_x0(teacher, schedule, prediction, x_t, t, condition).clamp(-1, 1)
    x_r = _ddim_jump(x_t, teacher_x0, _alpha_sigma(schedule, t, x_t), _alpha_sigma(schedule, r, x_t))
    later = network_x0(target_network, schedule, prediction, x_r, r.clamp(min=0), condition).clamp(-1, 1)
    return torch.where((r < 0).view(-1, 1, 1, 1), x_r, later)


def consistency_loss(
    student: nn.Module,
    teacher: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    x0: torch.Tensor,
    grid_steps: int,
    generator: torch.Generator | None = None,
    condition: Condition | Prompt | None = None,
    target_network: nn.Module | None = None,
) -> torch.Tensor:
    """Consistency distillation's loss on a grid of `grid_steps` (Song et al. 2023, eq. (7), squared error):
    t a random grid index, r the next one towards the data, mean || f(x_t, t) - stopgrad f(x_r, r) ||^2 in x_0, the
    target f(x_r, r) from `target_network` (None: the student itself)."""
    grid = trailing_grid(schedule, grid_steps, x0.device)
    k = torch.randint(0, len(grid), (len(x0),), generator=generator, device=x0.device)
    t = grid[k]
    r = torch.where(k > 0, grid[(k - 1).clamp(min=0)], -1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.noised(x0, noise, t)
    target_network = student if target_network is None else target_network
    target = consistency_target(target_network, teacher, schedule, prediction, x_t, t, r, condition)
    estimate = network_x0(student, schedule, prediction, x_t, t, condition)
    return F.mse_loss(estimate, target.float())


@torch.no_grad()
def progressive_target(
    teacher: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    x_t: torch.Tensor,
    t: torch.Tensor,
    middle: torch.Tensor,
    end: torch.Tensor,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """The x_0 a student's one DDIM step from t to `end` must use to land where two of the teacher's land, t to
    `middle` to `end` (Salimans & Ho 2022, Algorithm 2): with x_end the teacher's result,
        x0_target = (x_end - (sigma_end / sigma_t) x_t) / (alpha_end - (sigma_end / sigma_t) alpha_t),
    which is x_end itself when `end` is the clean end (-1)."""
    at_t, at_middle, at_end = (_alpha_sigma(schedule, index, x_t) for index in (t, middle, end))
    first = network_x0(teacher, schedule, prediction, x_t, t, condition).clamp(-1, 1)
    x_middle = _ddim_jump(x_t, first, at_t, at_middle)
    second = network_x0(teacher, schedule, prediction, x_middle, middle, condition).clamp(-1, 1)
    x_end = _ddim_jump(x_middle, second, at_middle, at_end)
    ratio = at_end[1] / at_t[1]
    return (x_end - ratio * x_t) / (at_end[0] - ratio * at_t[0])


def progressive_loss(
    student: nn.Module,
    teacher: nn.Module,
    schedule: NoiseSchedule,
    prediction: str,
    x0: torch.Tensor,
    student_steps: int,
    generator: torch.Generator | None = None,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """Progressive distillation's loss: at a random step of the student's grid (every other point of the teacher's
    grid of 2 x student_steps), the x_0 error against progressive_target weighted by max(SNR, 1), the "truncated
    SNR" weight that keeps the noisiest steps, where one step must draw the whole shape, in the loss (section 4)."""
    grid = trailing_grid(schedule, 2 * student_steps, x0.device)
    k = torch.randint(0, student_steps, (len(x0),), generator=generator, device=x0.device)
    t, middle = grid[2 * k + 1], grid[2 * k]
    end = torch.where(k > 0, grid[(2 * k - 1).clamp(min=0)], -1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.noised(x0, noise, t)
    target = progressive_target(teacher, schedule, prediction, x_t, t, middle, end, condition)
    estimate = network_x0(student, schedule, prediction, x_t, t, condition)
    weight = schedule.gather(schedule.snr, t, estimate).clamp(min=1)
    return (weight * (estimate - target.float()) ** 2).mean()


def _no_noise() -> torch.Tensor:
    raise RuntimeError("a deterministic solver drew noise")


@torch.no_grad()
def reflow_pairs(
    teacher: nn.Module,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    steps: int,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """The images the teacher's probability-flow ODE carries `noise` to: DPM-Solver++ in `steps` evaluations on
    the log-SNR grid (section 10), clipped to the data's range. Each (noise, image) is a pair for reflow."""
    spaced = schedule.respaced(steps, "logsnr")
    prediction = "velocity"  # reflow's teacher is a flow

    def output(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        time = time.float() if time.is_floating_point() else time
        return (teacher(x, time) if condition is None else teacher(x, time, condition)).float()

    denoise = make_denoiser(output, spaced, prediction)
    state = SamplerState(noise=_no_noise, evaluations=steps)
    return backward_process(noise, spaced, SAMPLERS["dpm++"], denoise, state).clamp(-1, 1)


def reflow_loss(
    student: nn.Module,
    teacher: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    teacher_steps: int,
    time_sampling: str = "logit-normal",
    generator: torch.Generator | None = None,
    condition: Condition | Prompt | None = None,
) -> torch.Tensor:
    """Reflow's loss (Liu et al. 2022, section 2.3): the flow-matching loss on the teacher's pairs, so the student
    learns the straight line from each noise to the image the teacher made of it. x0 only sets the batch's shape:
    the images are the teacher's."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    images = reflow_pairs(teacher, schedule, noise, teacher_steps, condition)
    return flow_matching_loss(student, images, time_sampling, generator, condition, len(schedule), noise=noise)


@register_sampler("consistency", spacing="time-trailing")
def consistency_step(schedule: NoiseSchedule, i: int, x_t: torch.Tensor, denoise: Denoiser, state: SamplerState):
    """One step of multistep consistency sampling (Song et al. 2023, arXiv 2303.01469, Algorithm 1).

    x0_hat = f(x_t, t) is already a sample; but for the last step it is noised afresh to the next, lower time of
    the grid, x = sqrt(alpha_bar_next) x0_hat + sqrt(1 - alpha_bar_next) z, for the next evaluation to refine.
    """
    x0_hat = denoise(x_t, i)
    if i == 0:
        return x0_hat
    alpha_bar_next = float(schedule.alpha_bars_prev[i])
    return math.sqrt(alpha_bar_next) * x0_hat + math.sqrt(1 - alpha_bar_next) * state.noise()


class Distiller(Trainer):
    """A Trainer whose objective is a distillation: the frozen teacher inside, the student its `model` (started
    from the teacher's weights), and the Trainer's loop, EMA, plan, checkpoints and resume unchanged.

    `teacher` is the teacher network (its EMA weights, as load_model gives them); train_config the student's
    (distillation_train_config). Progressive distillation promotes the student to teacher at every round's start.
    """

    def __init__(
        self,
        teacher: UNet,
        distillation: Distillation,
        train_config: TrainConfig,
        device: torch.device | str | None = None,
        data: torch.Tensor | ShapeBatch | None = None,
        precision: str | None = None,
    ) -> None:
        if distillation.method == "reflow" and teacher.config.schedule != "flow":
            raise ValueError("reflow straightens a flow: its teacher must be trained with the flow objective")
        super().__init__(teacher.config, train_config, device=device, data=data, precision=precision)
        self.distillation = distillation
        weights = teacher.state_dict()
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.model.load_state_dict(weights)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        # consistency: the target network, an average of the student (None: the student itself is its own target)
        averaged = distillation.target_decay is not None
        self.target_network = copy.deepcopy(self.model).eval().requires_grad_(False) if averaged else None
        self.round = 0  # progressive: the round being trained

    def objective_loss(self, x0: torch.Tensor, condition: Condition | Prompt | None) -> torch.Tensor:
        method, prediction = self.distillation.method, self.model_config.prediction
        student, teacher, schedule = self.train_model, self.teacher, self.schedule
        if method == "consistency":
            grid = consistency_grid(self.distillation, self.progress())
            return consistency_loss(
                student, teacher, schedule, prediction, x0, grid, self.generator, condition, self.target_network
            )
        if method == "progressive":
            self._catch_up_rounds()
            steps = self.distillation.steps
            return progressive_loss(student, teacher, schedule, prediction, x0, steps, self.generator, condition)
        steps, sampling = self.distillation.teacher_steps, self.train_config.time_sampling
        return reflow_loss(student, teacher, schedule, x0, steps, sampling, self.generator, condition)

    def train_step(self, x0: torch.Tensor, condition: Condition | Prompt | None = None) -> torch.Tensor:
        """The Trainer's step; then the target network moves towards the student: d target + (1 - d) student."""
        loss = super().train_step(x0, condition)
        if self.target_network is not None:
            with torch.no_grad():
                weight = 1 - self.distillation.target_decay
                torch._foreach_lerp_(list(self.target_network.parameters()), list(self.model.parameters()), weight)
        return loss

    def _catch_up_rounds(self) -> None:
        """Start the round the plan's progress is in: each round has an equal share of the plan."""
        rounds = self.distillation.rounds
        due = min(rounds - 1, int(self.progress() * rounds))
        while self.round < due:
            self._promote()

    def _promote(self) -> None:
        """The next round: the student (its EMA) becomes the teacher and the new student's start, at half the steps."""
        weights = self.sampling_model.state_dict()
        self.teacher.load_state_dict(weights)
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.model.load_state_dict(weights)
            self.ema.updates = 0
        self.round += 1
        self.distillation = dataclasses.replace(self.distillation, steps=self.distillation.steps // 2)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "teacher": self.teacher.state_dict(), "round": self.round}
        if self.target_network is not None:
            state["target_network"] = self.target_network.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
        self.round = int(state["round"])
        if self.target_network is not None:
            self.target_network.load_state_dict(state["target_network"])


def distiller_from(
    path: str | os.PathLike,
    method: str = DEFAULT_DISTILL_METHOD,
    device: torch.device | str | None = None,
    seed: int | None = None,
    precision: str | None = None,
    data: torch.Tensor | ShapeBatch | None = None,
    **changes: object,
) -> Distiller:
    """A Distiller of a trained checkpoint (its EMA weights as teacher), the method's defaults replaced by
    `changes` (Distillation fields). A checkpoint that is already distilled is refused: distil its teacher."""
    path = Path(path)
    payload = read_checkpoint(path)
    if payload.get("distillation") is not None:
        done = payload["distillation"].get("method", "?")
        raise CheckpointError(f"{path}: already distilled ({done}); distil the model it was tuned from instead")
    _check_choice("method", method, DISTILL_METHODS)
    teacher, _ = load_model(path, device="cpu")
    _, teacher_train = _configs_from(payload, path)
    distillation = Distillation.of(method, teacher=str(path), **changes)
    train_config = distillation_train_config(teacher_train, method, seed)
    return Distiller(teacher, distillation, train_config, device=device, data=data, precision=precision)


# ------------------------------------------------------------------------------------------
# A. Saving and loading: atomic writes, safe loads, clear errors
# ------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | os.PathLike, trainer: Trainer) -> Path:
    """Write model, EMA, optimiser, step, RNG and configs; atomically (temp file, fsync, rename).

    A crash or kill at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed before its rename
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": dataclasses.asdict(trainer.model_config),
        "train_config": dataclasses.asdict(trainer.train_config),
        "state": trainer.state_dict(),
    }
    if isinstance(trainer, Distiller):  # a tuned student: how it was tuned, and how it samples (section 13)
        payload["distillation"] = dataclasses.asdict(trainer.distillation)
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
        raise CheckpointError(
            f"{path}: refused to load, it holds pickled objects that are not plain weights ({_first_line(error)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or another format): {_first_line(error)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, "diffusion_patterns/1"):
        raise CheckpointError(f"{path}: not a diffusion_patterns checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return _from_format_1(payload, path) if payload["format"] == "diffusion_patterns/1" else payload


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


# Format "diffusion_patterns/1", as its last release wrote it: the same model, a TrainConfig whose `compile` is now
# `compile_model` and with a `condition_dropout_all` that nothing ever set (always 0), and no training plan (the
# learning rate followed each train() call's own budget). Such a run loads as it was trained; resuming it needs a
# budget. A /1 file written before its configuration had every one of these fields is refused: guessing the missing
# values could load it as something it was not trained as.
_FORMAT_1_MODEL_FIELDS = set(
    "schedule num_timesteps prediction base_channels channel_mults blocks_per_level pixel_unshuffle time_injection "
    "bottleneck_attention conditional dropout".split()
)
_FORMAT_1_TRAIN_FIELDS = set(
    "batch_size lr warmup_steps lr_schedule weight_decay grad_clip min_snr_gamma min_snr_form ema_decay "
    "condition_dropout condition_dropout_all seed log_every channels_last data_workers compile".split()
)


def _from_format_1(payload: dict, path: Path) -> dict:
    """A "diffusion_patterns/1" checkpoint in this version's terms, or a CheckpointError naming what it lacks."""
    model, train = dict(payload.get("model_config", {})), dict(payload.get("train_config", {}))
    missing = sorted((_FORMAT_1_MODEL_FIELDS - model.keys()) | (_FORMAT_1_TRAIN_FIELDS - train.keys()))
    if missing:
        raise CheckpointError(
            f"{path}: an early 'diffusion_patterns/1' checkpoint without {', '.join(missing)} in its configuration; "
            "it cannot be loaded as it was trained: train it again"
        )
    if train.pop("condition_dropout_all") != 0:
        raise CheckpointError(f"{path}: trained with condition_dropout_all, which this version no longer has")
    train["compile_model"] = train.pop("compile")
    train["time_sampling"] = "uniform"  # format 1 had DDPM's schedules only, with uniform timesteps
    state = {k: v for k, v in payload["state"].items() if k != "lr_schedule"}
    return {**payload, "format": CHECKPOINT_FORMAT, "model_config": model, "train_config": train, "state": state}


# Fields added to ModelConfig after /2 files were written, with the value those files were trained with (a default
# that changed would otherwise load them as something else).
_ADDED_MODEL_FIELDS = {"text_positions": "learned", "attention_heads": 4}


def _configs_from(payload: dict, path: Path) -> tuple[ModelConfig, TrainConfig]:
    try:
        model = {**_ADDED_MODEL_FIELDS, **payload["model_config"]}
        return ModelConfig(**model), TrainConfig(**payload["train_config"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its configuration is invalid: {error}") from None


def load_trainer(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    expect: ModelConfig | None = None,
    data: torch.Tensor | ShapeBatch | None = None,
    compile_model: bool | None = None,
    precision: str | None = None,
) -> Trainer:
    """Rebuild a Trainer from a checkpoint, its plan included, to resume training (or to sample from its EMA).

    compile_model, when given, replaces the saved one: it changes speed, not results. The precision is
    this device's (choose_precision) unless given, as in Trainer: a run may continue on another kind of device. An
    fp16 run's gradient-scaler state carries over when the resumed run is fp16 too.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    model_config, train_config = _configs_from(payload, path)
    if compile_model is not None:
        train_config = dataclasses.replace(train_config, compile_model=compile_model)
    if expect is not None and expect != model_config:
        differences = [
            f"{k}={v!r} in the file, {getattr(expect, k)!r} expected"
            for k, v in dataclasses.asdict(model_config).items()
            if getattr(expect, k) != v
        ]
        raise CheckpointError(f"{path}: made by a different model configuration: " + ", ".join(differences))
    trainer = _trainer_for(payload, path, model_config, train_config, device, data, precision)
    try:
        trainer.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match its model: {_first_mismatch(error)}") from None
    return trainer


def _trainer_for(payload, path, model_config, train_config, device, data, precision) -> Trainer:
    """A Trainer for the checkpoint's run, or a Distiller for a distillation run (its teacher comes with the state)."""
    if payload.get("distillation") is None:
        return Trainer(model_config, train_config, device=device, data=data, precision=precision)
    distillation = _distillation_from(payload, path)
    return Distiller(UNet(model_config), distillation, train_config, device=device, data=data, precision=precision)


def _distillation_from(payload: dict, path: Path) -> Distillation | None:
    record = payload.get("distillation")
    if record is None:
        return None
    try:
        return Distillation(**record)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its distillation record is invalid: {error}") from None


def checkpoint_sampling(path: str | os.PathLike) -> dict:
    """How a checkpoint samples by default, as `sample` keywords: a tuned student's recorded sampler, grid and
    evaluations (section 13), else the measured defaults (DEFAULT_SAMPLER, DEFAULT_STEPS, the sampler's grid)."""
    path = Path(path)
    distillation = _distillation_from(read_checkpoint(path), path)
    if distillation is None:
        return {"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "spacing": None}
    return {"sampler": distillation.sampler, "steps": distillation.steps, "spacing": distillation.spacing}


def _first_mismatch(error: Exception) -> str:
    """'Error(s) in loading state_dict ...:' plus its first detail line, cut to 300 characters."""
    return " ".join(line.strip() for line in str(error).splitlines()[:2])[:300]


def load_model(
    path: str | os.PathLike, device: torch.device | str | None = None, prefer_ema: bool = True
) -> tuple[UNet, NoiseSchedule]:
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
    return model.to(pick_device(str(device) if device is not None else None)).eval(), NoiseSchedule.from_config(
        model_config
    )


# ------------------------------------------------------------------------------------------
# B. Running fast: device, precision and kernel policy
# ------------------------------------------------------------------------------------------


def is_ampere_or_newer(device: torch.device | str, capability: tuple[int, int] | None = None) -> bool:
    """True for a CUDA card of compute capability 8.0+ (A100, L4, H100): it has TF32 tensor cores and native bf16.

    False for older cards (T4: 7.5), CPU and MPS. Pass `capability` to test the rule without a GPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


def choose_precision(device: torch.device | str, capability: tuple[int, int] | None = None) -> str:
    """The training and sampling precision for this device: "fp32" or "fp16" ("bf16" only on request).

    Ampere and newer cards run fp32 maths on TF32 tensor cores, which beats bf16 autocast for this small U-Net: the
    casts around every fp32 GroupNorm cost more than bf16 saves in the convolutions (benchmarks/RESULTS.md). Older
    cards such as the T4 have no TF32 and an fp32 rate far below their fp16 tensor cores, so they get fp16 with a
    gradient scaler. CPU and MPS stay in fp32.
    """
    if torch.device(device).type != "cuda":
        return "fp32"
    return "fp32" if is_ampere_or_newer(device, capability) else "fp16"


def check_precision(
    device: torch.device | str, precision: str | None, capability: tuple[int, int] | None = None
) -> str:
    """`precision` if this device can run it (None: choose_precision's pick), else a ValueError that says what it
    can run: CPU and MPS run fp32 only, and bf16 needs an Ampere or newer card (an older one such as the T4 would
    emulate it, slowly). Pass `capability` to test the rule without a GPU."""
    if precision is None:
        return choose_precision(device, capability)
    _check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device; {device} runs in fp32")
    if precision == "bf16" and not is_ampere_or_newer(device, capability):
        major, minor = capability or torch.cuda.get_device_capability(device)
        raise ValueError(
            "precision 'bf16' needs a GPU of compute capability 8.0+ (Ampere or newer); "
            f"this one is {major}.{minor}: use 'fp16' or 'fp32'"
        )
    return precision


@contextlib.contextmanager
def tf32_maths(enabled: bool) -> Iterator[None]:
    """Let fp32 matmuls and convolutions run on TF32 tensor cores (Ampere and newer cards) inside the context, and
    put PyTorch's process-wide switches back as they were on exit: "fp32" on these cards means fp32 storage with
    TF32 maths (10-bit mantissa products, fp32 sums), several times faster and plenty for this model."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def fused_adamw(device: torch.device) -> bool | None:
    """Whether AdamW should use its fused kernel here: one pass over each tensor instead of ~10 elementwise ops.

    None on MPS, which keeps PyTorch's default (fused is unmeasured there).
    """
    return True if device.type in ("cuda", "cpu") else None


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------
# C. Command line: python diffusion_utils.py {train, distill, sample, edit, inpaint, evaluate}
# ------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_center(text: str) -> tuple[float, float]:
    """ "30,40" -> (30.0, 40.0)."""
    parts = text.split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, e.g. 32,30, got {text!r}") from None
    return x, y


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="diffusion_utils.py", description="Train, sample, edit and evaluate the shapes DDPM.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    precision_help = "default: the device's best (fp32, TF32 maths on Ampere+; fp16 on older GPUs)"

    train = commands.add_parser("train", help="train a model (defaults: the recipe for the device)")
    _add_run_args(train, precision_help)
    train.add_argument("--resume", help="continue from this checkpoint: without a budget, to the end its run planned")
    train.add_argument(
        "--objective", choices=OBJECTIVES, help="flow (rectified flow, uniform t; the default) or diffusion (DDPM's)"
    )
    train.add_argument(
        "--conditional",
        action=argparse.BooleanOptionalAction,
        help=f"learn requests (class, centre, size) too (default: {'yes' if ModelConfig().conditional else 'no'})",
    )
    train.add_argument(
        "--conditioning",
        choices=CONDITIONINGS,
        help="what a conditional model reads: request (three numbers, the default) or prompt (words, cross-attention)",
    )
    train.add_argument("--compile", dest="compile_model", action="store_true", help="torch.compile the model (GPU)")

    distill = commands.add_parser("distill", help="tune a trained model to sample in 1-4 evaluations (section 13)")
    _add_run_args(distill, precision_help)
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="the trained model to tune (the teacher; its EMA weights)")
    source.add_argument("--resume", help="continue a distillation run: without a budget, to the end it planned")
    distill.add_argument(
        "--method", choices=DISTILL_METHODS, help=f"how to tune (default {DEFAULT_DISTILL_METHOD}; reflow: flow models)"
    )

    sample_cmd = commands.add_parser("sample", help="generate images from a checkpoint")
    sample_cmd.add_argument("--checkpoint", required=True)
    sample_cmd.add_argument("--n", type=int, default=64)
    _add_sampling_args(sample_cmd, precision_help)

    input_help = "a 64x64 grayscale PNG, or a .npy of one or many images (uint8, or floats in [0, 1] or [-1, 1])"
    edit_cmd = commands.add_parser("edit", help="turn rough sketches into clean shapes (SDEdit)")
    edit_cmd.add_argument("--checkpoint", required=True)
    edit_cmd.add_argument("--input", required=True, help=input_help)
    edit_cmd.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help=f"how far to noise the input, in (0, 1]: low keeps it, 1 ignores it (default {DEFAULT_STRENGTH})",
    )
    _add_sampling_args(edit_cmd, precision_help)

    inpaint_cmd = commands.add_parser("inpaint", help="fill in the hidden pixels of images (RePaint)")
    inpaint_cmd.add_argument("--checkpoint", required=True)
    inpaint_cmd.add_argument("--input", required=True, help=input_help)
    inpaint_cmd.add_argument(
        "--mask",
        required=True,
        help="the same kind of file, white (or true) at the pixels to keep; one or one per image",
    )
    inpaint_cmd.add_argument(
        "--resample",
        type=int,
        default=DEFAULT_RESAMPLE,
        help=f"RePaint's resamplings per step; 1 is plain replacement (default {DEFAULT_RESAMPLE})",
    )
    _add_sampling_args(inpaint_cmd, precision_help)

    evaluate = commands.add_parser("evaluate", help="print shape metrics of a samples .npy as JSON")
    evaluate.add_argument("samples")
    _add_request_args(evaluate, "also score how well the samples obey this request")
    _add_prompt_arg(evaluate, "also score, word by word, how well the samples obey this prompt")
    return parser


def _add_run_args(parser: argparse.ArgumentParser, precision_help: str) -> None:
    """The flags train and distill share: the budget, the checkpoint, the seed, the device and the progress bar."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock training budget (a new run, or a new phase)")
    budget.add_argument("--steps", type=int, help="number of optimiser steps (a new run, or a new phase)")
    parser.add_argument("--out", required=True, help="checkpoint path (written atomically)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: the fastest available)")
    parser.add_argument("--seed", type=int, help="seed of a new run (default 0); a resumed run keeps its own")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    parser.add_argument("--no-progress", action="store_true")


def _add_sampling_args(parser: argparse.ArgumentParser, precision_help: str) -> None:
    """sample's flags, which edit and inpaint take too: the sampler, the request, the seed, the device, the output."""
    parser.add_argument(
        "--steps",
        type=int,
        help=f"network evaluations per image, for every sampler (heun makes two per step; default {DEFAULT_STEPS}, "
        "or the tuned model's own)",
    )
    parser.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        help=f"default {DEFAULT_SAMPLER}, or the sampler a tuned model was made for (section 13)",
    )
    parser.add_argument("--eta", type=float, help="DDIM's noise scale (ddim only; default 0)")
    _add_request_args(parser)
    _add_prompt_arg(parser, 'ask a model trained with --conditioning prompt, e.g. "a small circle on the left"')
    default = f"default {DEFAULT_GUIDANCE:g}; {DEFAULT_PROMPT_GUIDANCE:g} for a prompt"
    parser.add_argument("--guidance", type=float, help=f"classifier-free guidance scale ({default})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device")
    parser.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    parser.add_argument("--out", required=True, help="a .npy file of uint8 images (N, 64, 64)")
    parser.add_argument("--png", help="also save a grid of (up to 64) images as a PNG")
    parser.add_argument("--no-progress", action="store_true")


def _add_prompt_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--prompt", metavar="TEXT", help=f"{help_text} (instead of the request flags)")


def _prompt_from(args: argparse.Namespace, condition: Condition | None) -> str | None:
    """The --prompt text, checked (read_prompt, prompt_tokens), or None; never with the request flags."""
    if args.prompt is None:
        return None
    if condition is not None:
        flags = "/".join(f"--{f.argument}" for f in REQUEST_FIELDS)
        raise ValueError(f"give --prompt or the request flags ({flags}), not both")
    prompt_tokens(args.prompt)
    return args.prompt


def _add_request_args(parser: argparse.ArgumentParser, note: str = "ask a conditional model for") -> None:
    """One flag per request field (RequestField.argument and .flag), in the order a request is written."""
    group = parser.add_argument_group("request", f"{note}: any of these")
    fields = {f.name: f for f in REQUEST_FIELDS}
    for f in (fields[name] for name in REQUEST_ORDER):
        options = f.flag() if f.categories is None else {"choices": f.categories(), **f.flag()}
        group.add_argument(f"--{f.argument}", **options)


def _request_from(args: argparse.Namespace, n: int) -> Condition | None:
    asked = {f.argument: getattr(args, f.argument) for f in REQUEST_FIELDS}
    if all(value is None for value in asked.values()):
        return None
    return request(n, **asked)


def _command_train(args: argparse.Namespace) -> None:
    _check_train_args(args)
    if args.resume:
        trainer = load_trainer(
            args.resume, args.device, compile_model=args.compile_model or None, precision=args.precision
        )
        print(f"resuming from {args.resume} at step {trainer.step}")
    else:
        device = pick_device(args.device)
        objective, conditioning = args.objective or DEFAULT_OBJECTIVE, args.conditioning or "request"
        model_config, train_config = default_configs(device, objective, conditioning)
        if args.conditional is not None:
            model_config = dataclasses.replace(model_config, conditional=args.conditional)
        seed = 0 if args.seed is None else args.seed
        train_config = dataclasses.replace(train_config, seed=seed, compile_model=args.compile_model)
        trainer = Trainer(model_config, train_config, device=device, precision=args.precision)
    _run(trainer, args)


def _run(trainer: Trainer, args: argparse.Namespace) -> None:
    """train's and distill's loop: the budget or the plan left, progress, checkpoints, and a last line."""
    print(f"{describe_model(trainer.model)}; device {trainer.device}, precision {trainer.precision}")
    trainer.train(
        steps=args.steps,
        minutes=args.minutes,
        progress=not args.no_progress,
        checkpoint_path=args.out,
        checkpoint_every=args.checkpoint_every,
    )
    final = f"final loss {trainer.losses[-1]:.4f}" if trainer.losses else "no step fitted in the budget"
    print(f"trained to step {trainer.step} ({trainer.images_seen} images); {final}; saved {args.out}")


def _check_run_args(args: argparse.Namespace) -> None:
    """train's and distill's shared arguments checked before anything is built or written."""
    if args.steps is None and args.minutes is None and not args.resume:
        raise ValueError("give a training budget: --minutes M or --steps N (or --resume a run to finish its plan)")
    if args.steps is not None or args.minutes is not None:
        TrainingPlan.of(0, args.steps, args.minutes)  # the budget's own checks
    _check_positive_int("checkpoint_every", args.checkpoint_every)
    if args.resume and args.seed is not None:
        raise ValueError(
            "--seed starts a new run; a resumed run continues its own random stream (drop --seed or --resume)"
        )


def _check_train_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything is built or written."""
    _check_run_args(args)
    if args.resume and (args.conditional is not None or args.objective is not None or args.conditioning is not None):
        raise ValueError(
            "a resumed run keeps its own model: drop --conditional, --objective, --conditioning or --resume"
        )


def _command_distill(args: argparse.Namespace) -> None:
    _check_run_args(args)
    if args.resume and args.method is not None:
        raise ValueError("a resumed run keeps its own method: drop --method or --resume")
    if args.checkpoint and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--out {args.out} would overwrite the teacher: write the tuned model to another file")
    if args.resume:
        trainer = load_trainer(args.resume, args.device, precision=args.precision)
        if not isinstance(trainer, Distiller):
            raise ValueError(
                f"{args.resume}: not a distillation run (resume it with train, or distil it with --checkpoint)"
            )
        print(f"resuming the {trainer.distillation.method} run of {args.resume} at step {trainer.step}")
    else:
        method = args.method or DEFAULT_DISTILL_METHOD
        trainer = distiller_from(args.checkpoint, method, args.device, args.seed, args.precision)
        print(f"tuning {args.checkpoint} by {method}")
    _run(trainer, args)
    d = trainer.distillation
    print(f"samples with: sample --checkpoint {args.out} (sampler {d.sampler}, {d.steps} evaluations by default)")


def _command_sample(args: argparse.Namespace) -> None:
    _check_out(args.out)
    _check_positive_int("--n", args.n)
    _use_recorded_sampling(args)
    asked = _asked(args, args.n)
    model, schedule = load_model(args.checkpoint, device=args.device)
    result = sample(model, schedule, args.n, **asked, **_sampling_options(args))
    _save_images(args, result.images, asked, f"{args.sampler}, {args.steps} steps", "samples")


def _command_edit(args: argparse.Namespace) -> None:
    _check_out(args.out)
    _check_strength(args.strength)
    _use_recorded_sampling(args)
    images = uint8_to_model(read_images(args.input))
    asked = _asked(args, len(images))
    model, schedule = load_model(args.checkpoint, device=args.device)
    result = edit(model, schedule, images, args.strength, **asked, **_sampling_options(args))
    _save_images(args, result.images, asked, f"edited at strength {args.strength:g}, {args.sampler}")


def _command_inpaint(args: argparse.Namespace) -> None:
    _check_out(args.out)
    _check_positive_int("--resample", args.resample)
    _use_recorded_sampling(args)
    images = uint8_to_model(read_images(args.input))
    mask = torch.from_numpy(read_images(args.mask, "mask") > 127).unsqueeze(1)
    if len(mask) not in (1, len(images)):
        raise ValueError(f"{args.mask}: {len(mask)} masks for {len(images)} images; give one, or one per image")
    try:
        mask = _checked_mask(mask, len(images))
    except ValueError as error:  # keeps every pixel or none: name the file
        raise ValueError(f"{args.mask}: {error}") from None
    asked = _asked(args, len(images))
    model, schedule = load_model(args.checkpoint, device=args.device)
    result = inpaint(model, schedule, images, mask, args.resample, **asked, **_sampling_options(args))
    _save_images(args, result.images, asked, f"inpainted, resample {args.resample}, {args.sampler}")


def _check_out(out: str) -> None:
    if not out.endswith(".npy"):
        raise ValueError(f"--out must end in .npy, got {out!r}")


def _asked(args: argparse.Namespace, n: int) -> dict:
    """sample's condition, prompt and guidance from the request flags or --prompt (one of them), checked."""
    condition = _request_from(args, n)
    prompt = _prompt_from(args, condition)
    if args.guidance is not None and condition is None and prompt is None:
        raise ValueError("--guidance steers towards a request: give --shape, --size, --center or --prompt too")
    return {"condition": condition, "prompt": prompt, "guidance": args.guidance}  # None: sample's default_guidance


def _use_recorded_sampling(args: argparse.Namespace) -> None:
    """--sampler and --steps where not given: the checkpoint's (checkpoint_sampling), with its grid when its sampler
    is the one used; a sampler given by name samples on its own grid."""
    recorded = checkpoint_sampling(args.checkpoint)
    args.spacing = recorded["spacing"] if args.sampler in (None, recorded["sampler"]) else None
    args.sampler = args.sampler or recorded["sampler"]
    args.steps = recorded["steps"] if args.steps is None else args.steps


def _sampling_options(args: argparse.Namespace) -> dict:
    """sample's keyword arguments from the flags of _add_sampling_args."""
    return {
        "steps": args.steps,
        "sampler": args.sampler,
        "eta": args.eta,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
        "precision": args.precision,
        "spacing": args.spacing,
    }


def _save_images(args: argparse.Namespace, images: torch.Tensor, asked: dict, title: str, noun: str = "images") -> None:
    """--out (and --png), and the scores of the request or prompt when one was asked."""
    condition, prompt = asked["condition"], asked["prompt"]
    as_uint8 = model_to_uint8(images)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, as_uint8)
    print(f"saved {len(as_uint8)} {noun} to {args.out}")
    if condition is not None:
        print(json.dumps(to_json(evaluate_requests(as_uint8, condition))))
    if prompt is not None:
        print(json.dumps(to_json(evaluate_prompts(as_uint8, prompt))))
    if args.png:
        described = describe_request(condition) if condition is not None else repr(prompt) if prompt else ""
        title += f", {described}" if described else ""
        plot_grid(images[:64], title=title).savefig(args.png, dpi=100)
        print(f"saved a grid to {args.png}")


def _command_evaluate(args: argparse.Namespace) -> None:
    images = read_images(args.samples, "samples")
    condition = _request_from(args, len(images))
    prompt = _prompt_from(args, condition)
    metrics = evaluate_samples(images)
    if condition is not None:
        metrics["request"] = evaluate_requests(images, condition)
    if prompt is not None:
        metrics["prompt"] = evaluate_prompts(images, prompt)
    print(json.dumps(to_json(metrics), indent=2))


def read_images(path: str | os.PathLike, what: str = "input") -> np.ndarray:
    """(N, 64, 64) uint8 images from a grayscale PNG or a .npy of one image (64, 64) or many ((N, 64, 64) or
    (N, 1, 64, 64)): uint8 (or bool, white for True), or floats in [0, 1] or in [-1, 1] (read so when any value is
    negative). A pickled .npy is refused unread, as is colour, another size, or values outside those ranges; each
    with one ValueError naming the file and, as `what`, the role it plays."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as file:
        head = file.read(8)
    numpy_like = head.startswith((b"\x93NUMPY", b"PK")) or path.suffix == ".npy"  # PK: a zip (.npz, checkpoint)
    array = _read_npy(path, what) if numpy_like else _read_png(path, what)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or len(array) == 0:
        raise ValueError(f"{path}: {what} must be one 64x64 image or (N, 64, 64) images, got shape {array.shape}")
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        height, width = array.shape[1:]
        raise ValueError(
            f"{path}: the {what} is {width}x{height} pixels, not the {IMAGE_SIZE}x{IMAGE_SIZE} of the images"
        )
    return _as_uint8(array, path, what)


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:  # pickled, empty, truncated or not .npy at all
        raise ValueError(f"{path}: not a plain .npy array ({_first_line(error)})") from None
    if not isinstance(array, np.ndarray):  # np.load opens a zip (.npz, or a checkpoint) as an archive
        array.close()
        raise ValueError(f"{path}: not a {what} .npy array but a zip archive (a checkpoint or an .npz?)")
    return array


def _read_png(path: Path, what: str) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # unchanged: a colour file stays colour, to be refused
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read (a PNG) nor a .npy array")
    if image.ndim == 3:
        raise ValueError(f"{path}: a colour image ({image.shape[2]} channels); the {what} must be grayscale")
    if image.dtype == np.uint16:  # a 16-bit grayscale PNG
        image = np.round(image / 257.0).astype(np.uint8)
    return image


def _as_uint8(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """uint8 from uint8, bool (True as 255) or floats in [0, 1] or [-1, 1]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: {what} must be uint8 in [0, 255] or floats in [0, 1] or [-1, 1], got {array.dtype}")
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1 or high > 1:
        raise ValueError(f"{path}: float {what} must lie in [0, 1] or [-1, 1], got values in [{low:.7g}, {high:.7g}]")
    scaled = (array.astype(np.float64) + 1) * 127.5 if low < 0 else array.astype(np.float64) * 255
    return np.round(scaled).astype(np.uint8)


def to_json(value: object) -> object:
    """Plain JSON values: NaN and inf (a metric with nothing to measure) as None, since JSON has no NaN and strict
    parsers reject the token; tuples, arrays and tensors as lists, numpy scalars as numbers, dataclasses as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "train": _command_train,
        "distill": _command_distill,
        "sample": _command_sample,
        "edit": _command_edit,
        "inpaint": _command_inpaint,
        "evaluate": _command_evaluate,
    }
    command = commands[args.command]
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
