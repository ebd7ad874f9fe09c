"""Side by side with Hugging Face diffusers: speed, quality at equal wall-clock time, efficiency.

Same data (du.training_batches, same seed), same device, same batch size (our default for the
device unless --batch-size), same mixed precision (du.choose_precision) for every run. Five rows
(--rows picks which of them (b) trains; default all):

  ours                    du.default_configs(device) via du.Trainer, sampled with du.sample
  diffusers-defaults      diffusers' example recipe on a full-resolution (64x64) UNet2DModel of
                          about our parameter count
  diffusers-best          the same network with the recipe's main choices (cosine, v, EMA, lr 1e-3)
  diffusers-same-network  UNet2DModel shaped like our U-Net on the same pixel-unshuffled input,
                          trained by du.Trainer and sampled by du.sample: only the network differs
  diffusers-same-recipe   that network trained and sampled with diffusers' own parts configured
                          like our recipe: the whole recipe, like for like

Why: ours against a full-resolution UNet2DModel mostly measures the network stem (we fold 4x4
pixels into 16 channels and run at 16x16), not the code; the two "same" rows take the stem and
the recipe out of the comparison, one at a time.

(a) Training throughput, images/s, and FLOPs per training image (forward + backward).
    Shared step (du.diffusion_loss with eps target, backward, grad clip, AdamW), the same for
    every network, in contiguous and channels_last layouts: our default U-Net; a 64x64 diffusers
    UNet2DModel of comparable parameter count (chosen automatically within ~15%, or
    --diffusers-channels/--diffusers-layers; in/out channels 1, plain Down/UpBlock2D, the default
    attention in the mid block); and diffusers-same-network:
      PixelUnshuffle(4) -> UNet2DModel(sample_size 16, in/out channels 16, block_out_channels
      base_channels x channel_mults = (24, 48), layers_per_block = blocks_per_level, DownBlock2D /
      UpBlock2D, mid block with attention of our 4 heads (attention_head_dim 48 / 4), GroupNorm
      groups gcd(8, widths), the time embedding ours is: [cos, sin] features of base_channels
      (flip_sin_to_cos, freq_shift 0) and a Linear-SiLU-Linear to 4 x base_channels) -> PixelShuffle(4)
      What it cannot copy (each up level of UNet2DModel has layers_per_block + 1 resnets and also
      takes skips after conv_in and each downsampler; its resnets add a projection of SiLU(time);
      its own initialisation; no request embedding, so it is
      unconditional) is printed with the row.
    Whole training steps, each in our recipe's layout: ours (du.Trainer.train_step: min-SNR,
    EMA, lr schedule), diffusers-same-network in that very step, and diffusers-same-recipe's step.
(b) Quality after --minutes of training each (evaluation not counted), each scored by
    du.evaluate_samples on --samples images:
      ours                   sampled with --ours-samplers and DDIM --ddim-steps
      diffusers-defaults     as diffusers' examples/unconditional_image_generation/train_unconditional.py
                             by default: DDPMScheduler(1000, "linear", "epsilon"), AdamW lr 1e-4,
                             betas (0.95, 0.999), weight decay 1e-6, eps 1e-8, cosine lr schedule
                             with 500 warm-up steps (its length estimated from the measured
                             throughput, since the budget is wall-clock), grad clip 1.0, no EMA
                             (the script's --use_ema is off by default; --defaults-ema turns it on)
      diffusers-best         DDPMScheduler("squaredcos_cap_v2", "v_prediction"), target
                             scheduler.get_velocity, EMA via diffusers.training_utils.EMAModel
                             (decay 0.999 with warm-up), lr 1e-3 with 200 warm-up steps then constant
                             (our recipe's lr), the same AdamW betas/weight decay as the example
      diffusers-same-network du.Trainer around that network (unconditional; our
                             schedule, loss, min-SNR table, AdamW, warm-up, lr schedule, EMA, grad
                             clip, layout), sampled like ours
      diffusers-same-recipe  the same network; DDPMScheduler(T, our schedule as "squaredcos_cap_v2",
                             our target as "v_prediction") for add_noise and get_velocity; our
                             min-SNR weight written with diffusers.training_utils.compute_snr
                             (cap form, for v: min(SNR + 1, gamma) / (SNR + 1)); EMAModel with our
                             decay and our warm-up (1 + k) / (10 + k) (use_ema_warmup off, foreach);
                             AdamW with our lr, betas, weight decay; get_scheduler with our warm-up
                             and our lr schedule ("constant_with_warmup", or "cosine" to 0 over the
                             step count estimated from the measured throughput when ours decays);
                             grad clip and layout ours; sampled with DDPMScheduler at du.DEFAULT_STEPS
                             steps (clip_sample, "linspace" timesteps: our grid) and DDIMScheduler
    The 64x64 diffusers rows sample with DDIMScheduler.from_config(...) at --ddim-steps (and
    DDPMScheduler with --diffusers-ddpm-steps).
(c) Sampling time for --samples images at --ddim-steps DDIM steps, with validity (from the models
    of (b); untrained models when (b) is not run): du.sample for ours and diffusers-same-network,
    diffusers' DDIMScheduler loop for the others.
(d) Hardware efficiency: FLOPs per training image (FlopCounterMode) x images/s from (a), as a share
    of a measured square torch.mm rate (fp32, and the training precision when that differs) on the
    same device in the same run.

Needs diffusers: pip install -r benchmarks/requirements-diffusers.txt (torch already installed).

Full run on the 2-core CPU, all five rows (about 45 min: 5 x 5 min of training, about 10 min of
sampling, mostly the two 64x64 rows at 50 DDIM steps, and 5 min of (a)):
    python benchmarks/vs_diffusers.py --minutes 5
Only the like-for-like rows (about 20 min: (a) without the 64x64 network, 3 x 5 min of training):
    python benchmarks/vs_diffusers.py --minutes 5 --rows ours,diffusers-same-network,diffusers-same-recipe
Smoke test, all rows (under a minute), then the two like-for-like diffusers rows alone with ours' cosine lr
schedule (so diffusers-same-recipe takes get_scheduler("cosine") over the estimated step count):
    python benchmarks/vs_diffusers.py --minutes 0.05 --samples 8 --throughput-seconds 2 --ours-samplers ddim:5 \\
        --ddim-steps 5 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
    python benchmarks/vs_diffusers.py --minutes 0.05 --samples 8 --throughput-seconds 2 --ours-samplers ddim:5 \\
        --ddim-steps 5 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1 --lr-schedule cosine \\
        --rows diffusers-same-network,diffusers-same-recipe
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import sys
import time
import unittest.mock
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import diffusion_utils as du  # noqa: E402

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
except ImportError:  # the script says how to install it
    diffusers = None

OUR_UNET = du.UNet  # trainer_with_network stands another network in for du.UNet while a Trainer is built
ROWS = ("ours", "diffusers-defaults", "diffusers-best", "diffusers-same-network", "diffusers-same-recipe")


# ------------------------------------------------------------------------------------------
# The diffusers networks: a 64x64 one sized like ours, and one shaped like ours
# ------------------------------------------------------------------------------------------


class DiffusersNet(nn.Module):
    """A UNet2DModel called like du.UNet: net(x, t) -> tensor (so du.diffusion_loss can drive it)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_unet(channels: tuple[int, ...], layers: int, attention: bool) -> nn.Module:
    groups = math.gcd(32, *channels)  # GroupNorm groups must divide every width
    return UNet2DModel(
        sample_size=du.IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        add_attention=attention,
        norm_num_groups=groups,
    )


def match_diffusers_config(target: int, attention: bool) -> tuple[tuple[int, ...], int, int]:
    """(block_out_channels, layers_per_block, parameters) of a grid entry close to target.

    Among the entries within 5% of the target, the one with the fewest levels wins (then the
    closest count); if none is that close, simply the closest.
    """
    candidates = []
    for width, mults, layers in itertools.product(
        (8, 16, 24, 32, 48, 64, 96, 128),
        ((1, 1, 2), (1, 2, 2), (1, 2, 4), (1, 1, 2, 2), (1, 2, 2, 2), (1, 2, 2, 4)),
        (1, 2),
    ):
        channels = tuple(width * m for m in mults)
        with torch.device("meta"):
            count = du.count_parameters(diffusers_unet(channels, layers, attention))
        candidates.append((abs(math.log(count / target)), len(channels), channels, layers, count))
    close = [c for c in candidates if c[0] <= math.log(1.05)]
    best = min(close, key=lambda c: (c[1], c[0])) if close else min(candidates)
    return best[2], best[3], best[4]


def our_attention_heads(config: du.ModelConfig) -> int:
    """The head count of our bottleneck attention (du.UNet fixes it; read from a network on the meta device)."""
    with torch.device("meta"):
        attention = OUR_UNET(dataclasses.replace(config, bottleneck_attention=True)).mid_attention
    return attention.heads


class SameNetwork(nn.Module):
    """diffusers-same-network: PixelUnshuffle -> UNet2DModel shaped like our U-Net -> PixelShuffle.

    Called like du.UNet, net(x, t) -> tensor; `config` is the du.ModelConfig it stands in for (du.sample reads the
    prediction type there). What UNet2DModel cannot copy is listed by same_network_notes.
    """

    def __init__(self, config: du.ModelConfig) -> None:
        super().__init__()
        self.config = config
        factor = config.pixel_unshuffle
        widths = tuple(config.base_channels * m for m in config.channel_mults)
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(factor), nn.PixelShuffle(factor)
        self.unet = UNet2DModel(
            sample_size=du.IMAGE_SIZE // factor,
            in_channels=factor * factor,
            out_channels=factor * factor,
            block_out_channels=widths,
            layers_per_block=config.blocks_per_level,
            down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths),
            add_attention=config.bottleneck_attention,
            attention_head_dim=widths[-1] // our_attention_heads(config),  # heads = channels // head dim
            norm_num_groups=math.gcd(8, *widths),  # ours: GroupNorm(gcd(8, c), c); diffusers takes one count
            dropout=config.dropout,
            time_embedding_type="positional",
            flip_sin_to_cos=True,  # [cos, sin], as du.sinusoidal_embedding
            freq_shift=0,  # frequencies 10000^(-k / half), as ours
            time_embedding_dim=config.base_channels * 4,  # Linear(base, 4 base) -> SiLU -> Linear, as du.UNet.time_mlp
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.unet(self.unshuffle(x), t).sample)


def same_network_config(config: du.ModelConfig) -> du.ModelConfig:
    """Our model config without what UNet2DModel has no place for: the request input."""
    return dataclasses.replace(config, conditional=False)


def same_network_notes(ours: du.ModelConfig) -> list[str]:
    """How diffusers-same-network differs from our U-Net: what UNet2DModel does not allow."""
    notes = [
        "each up level has layers_per_block + 1 resnets, and the down path also keeps skips after conv_in and after "
        "each downsampler (ours: one skip per level, joined before the level's first block)",
        "its resnets add a projection of SiLU(time embedding) (ours: of the embedding itself)",
        "diffusers' own initialisation (ours zero-inits the last conv of every block and of the attention output)",
    ]
    if ours.conditional:
        notes.append("unconditional: our request embedding is left out (ours is sampled unconditionally here)")
    if ours.time_injection != "every_block":
        notes.append(f"time enters every resnet (ours: {ours.time_injection.replace('_', ' ')})")
    if len({math.gcd(8, ours.base_channels * m) for m in ours.channel_mults}) > 1:
        notes.append("one GroupNorm group count for every width (ours: gcd(8, c) per width)")
    return notes


def trainer_with_network(
    model_config: du.ModelConfig,
    train_config: du.TrainConfig,
    device: torch.device,
    network: Callable[[du.ModelConfig], nn.Module],
) -> du.Trainer:
    """A du.Trainer, i.e. our whole training step, around another network.

    du.Trainer takes no network: it builds du.UNet(model_config) itself. `network` stands in for du.UNet while the
    Trainer is built, so its weights are drawn under the Trainer's seed and everything else (schedule, loss-weight
    table, AdamW, warm-up and lr schedule, EMA, grad clip, layout, precision) is exactly what ours gets.
    """
    with unittest.mock.patch.object(du, "UNet", network):
        return du.Trainer(model_config, train_config, device=device)


# ------------------------------------------------------------------------------------------
# (a) Throughput: one identical training step for every network
# ------------------------------------------------------------------------------------------


class HarnessStep:
    """du.diffusion_loss (eps target, plain MSE) + backward + grad clip + AdamW: the same for any net."""

    def __init__(self, net: nn.Module, device: torch.device, precision: str, channels_last: bool, seed: int) -> None:
        self.net = net.to(device).train()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.device, self.precision = device, precision
        self.schedule = du.NoiseSchedule.create("linear")
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=1e-4, fused=du.fused_adamw(device)
        )  # as du.Trainer
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.generator = torch.Generator(device).manual_seed(seed)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with du.autocast_for(self.device, self.precision):
            return du.diffusion_loss(self.net, self.schedule, x0, "eps", None, self.generator)

    def __call__(self, batch: tuple[torch.Tensor, du.Condition | None]) -> torch.Tensor:
        """One step on an (images, condition) batch of du.training_batches; the condition is not used."""
        loss = self.loss(batch[0])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


# ------------------------------------------------------------------------------------------
# (b) Training with diffusers' own pieces, for a wall-clock budget
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DiffusersRecipe:
    name: str
    beta_schedule: str
    prediction_type: str
    lr: float
    warmup_steps: int
    lr_schedule: str  # a diffusers.optimization.get_scheduler name
    ema_decay: float | None
    adam_betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    network: str = "64x64"  # "64x64": the full-resolution UNet2DModel of about our size; "same": SameNetwork
    ema_warmup: str = "power"  # "power": EMAModel's use_ema_warmup (inv_gamma 1, power 3/4); "ours": (1+k)/(10+k)
    ema_foreach: bool = False  # EMAModel's foreach (one fused update, as du.EMA)
    min_snr_gamma: float | None = None  # None: plain MSE; else du's min-SNR weight from compute_snr
    min_snr_form: str = "cap"  # as du.TrainConfig.min_snr_form
    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"  # the sampling schedulers' grid; "linspace" is ours
    channels_last: bool = False
    ddpm_steps: int | None = None  # also sample with DDPMScheduler at this many steps (None: --diffusers-ddpm-steps)


class DiffusersRun:
    """Train a diffusers network with diffusers' parts (as their example does), then sample it with their schedulers.

    The network is called like du.UNet (DiffusersNet or SameNetwork): net(x, t) -> tensor.
    """

    def __init__(
        self,
        recipe: DiffusersRecipe,
        make_net: Callable[[], nn.Module],
        device: torch.device,
        precision: str,
        batch_size: int,
        seed: int,
        estimated_steps: int,
    ) -> None:
        self.recipe, self.device, self.precision, self.batch_size, self.seed = (
            recipe,
            device,
            precision,
            batch_size,
            seed,
        )
        torch.manual_seed(seed)
        self.net = make_net().to(device).train()
        if recipe.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=recipe.num_train_timesteps,
            beta_schedule=recipe.beta_schedule,
            prediction_type=recipe.prediction_type,
            timestep_spacing=recipe.timestep_spacing,
            clip_sample=True,  # x0_hat clipped to [-1, 1] when sampling (the default; ours too)
        )
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(),
            lr=recipe.lr,
            betas=recipe.adam_betas,
            weight_decay=recipe.weight_decay,
            eps=recipe.adam_eps,
        )
        self.lr_scheduler = get_scheduler(
            recipe.lr_schedule,
            optimizer=self.optimizer,
            num_warmup_steps=recipe.warmup_steps,
            num_training_steps=max(estimated_steps, recipe.warmup_steps + 1),
        )
        warmup = {"use_ema_warmup": True, "inv_gamma": 1.0, "power": 3 / 4} if recipe.ema_warmup == "power" else {}
        self.ema = (
            EMAModel(self.net.parameters(), decay=recipe.ema_decay, foreach=recipe.ema_foreach, **warmup)
            if recipe.ema_decay
            else None
        )
        self.generator = torch.Generator(device).manual_seed(seed)
        self.step, self.images_seen, self.losses = 0, 0, []

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """du's min-SNR weight (NoiseSchedule.loss_weights) written with diffusers' compute_snr.

        lam = SNR (epsilon) or SNR + 1 (v_prediction) is the x_0 weight plain MSE on that target gives; "cap":
        min(lam, gamma) / lam; "paper": min(SNR, gamma) / lam (diffusers' train_text_to_image.py form).
        """
        snr = compute_snr(self.scheduler, t)
        lam = snr + 1 if self.recipe.prediction_type == "v_prediction" else snr
        capped = (lam if self.recipe.min_snr_form == "cap" else snr).clamp(max=self.recipe.min_snr_gamma)
        return capped / lam

    def train_step(self, batch: tuple[torch.Tensor, du.Condition | None]) -> torch.Tensor:
        """One optimiser step on an (images, condition) batch; the condition is not used. Returns the loss tensor."""
        x0 = batch[0].to(self.device, non_blocking=True)
        if self.recipe.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator, device=self.device
        )
        noisy = self.scheduler.add_noise(x0, noise, t)
        with du.autocast_for(self.device, self.precision):
            output = self.net(noisy, t)
        target = noise if self.recipe.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        if self.recipe.min_snr_gamma is None:
            loss = F.mse_loss(output.float(), target.float())
        else:
            per_image = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (self.min_snr_weights(t) * per_image).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.net.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += len(x0)
        return loss.detach()

    def train(self, minutes: float) -> None:
        deadline = time.monotonic() + minutes * 60
        batches = du.training_batches(self.batch_size, self.seed, self.step)
        pending = []
        while time.monotonic() < deadline:
            pending.append(self.train_step(next(batches)))
            if len(pending) >= 10:
                self.losses += torch.stack(pending).float().cpu().tolist()
                pending = []
        if pending:
            self.losses += torch.stack(pending).float().cpu().tolist()
        bc.synchronize(self.device)

    def sampling_net(self) -> nn.Module:
        """The EMA weights copied into a twin network (the training weights stay as they are)."""
        if self.ema is None:
            return self.net.eval()
        twin = copy.deepcopy(self.net).eval()
        self.ema.copy_to(twin.parameters())
        return twin

    @torch.no_grad()
    def sample(self, n: int, sampler: str, steps: int, seed: int = 1234, batch_size: int = 256) -> torch.Tensor:
        """n images with DDIMScheduler (eta 0) or DDPMScheduler built from the training config."""
        net = self.sampling_net()
        scheduler_class = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        scheduler = scheduler_class.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        images = torch.empty(n, 1, du.IMAGE_SIZE, du.IMAGE_SIZE)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            generator = torch.Generator(self.device).manual_seed(seed * 1_000_003 + start)
            x = torch.randn((stop - start, 1, du.IMAGE_SIZE, du.IMAGE_SIZE), generator=generator, device=self.device)
            for t in scheduler.timesteps:
                with du.autocast_for(self.device, self.precision):
                    output = net(x, t).float()
                extra = {"eta": 0.0} if sampler == "ddim" else {}
                x = scheduler.step(output, t, x, generator=generator, **extra).prev_sample
            images[start:stop] = x.clamp(-1, 1).cpu()
        return images


# ------------------------------------------------------------------------------------------
# Reporting columns and labels
# ------------------------------------------------------------------------------------------

THROUGHPUT_COLUMNS = [
    ("name", "network / step", ""),
    ("parameters", "parameters", ","),
    ("gflops_per_image", "GFLOP / training image", ".3f"),
    ("layout", "layout", ""),
    ("images_per_s", "images/s", ".1f"),
    ("ours_speedup", "ours / this (same kind of step, layout)", ".2f"),
]
QUALITY_COLUMNS = [
    ("run", "run", ""),
    ("steps_trained", "steps", ""),
    ("images_seen", "images seen", ""),
    ("loss", "loss (last 50)", ".4f"),
    ("implementation", "sampler code", ""),
    ("sampler", "sampler", ""),
    ("steps", "sampling steps", ""),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1", ".2f"),
    ("position_w1", "position W1", ".2f"),
]
SAMPLING_COLUMNS = [
    ("run", "run", ""),
    ("implementation", "sampler code", ""),
    ("steps", "DDIM steps", ""),
    ("n", "n", ""),
    ("sample_seconds", "seconds", ".2f"),
    ("images_per_s", "images/s", ".1f"),
    ("valid", "valid", "%"),
    ("trained", "trained", ""),
]
FLOP_COLUMNS = [
    ("name", "network / step", ""),
    ("parameters", "parameters", ","),
    ("gflops_per_image", "GFLOP / training image", ".3f"),
    ("images_per_s", "images/s (a)", ".1f"),
    ("achieved_gflops", "achieved GFLOP/s", ".1f"),
    ("share_fp32", "share of fp32 mm", "%"),
    ("share_train_precision", "share of mm in training precision", "%"),
]
# (a)'s timed steps: key "<step>|<layout>". The shared step runs on each network; the whole steps are each
# row's own training step, compared with ours (du.Trainer.train_step).
STEP_LABELS = {
    "ours": "ours (du.UNet), shared step",
    "diffusers": "diffusers UNet2DModel 64x64, shared step",
    "same-network": "diffusers-same-network, shared step",
    "trainer": "ours, whole du.Trainer.train_step",
    "same-network-trainer": "diffusers-same-network, whole du.Trainer.train_step",
    "same-recipe": "diffusers-same-recipe, whole diffusers step",
}
NETWORK_OF = {
    "ours": "ours",
    "trainer": "ours",
    "diffusers": "diffusers",
    "same-network": "same-network",
    "same-network-trainer": "same-network",
    "same-recipe": "same-network",
}
NETWORK_LABELS = {
    "ours": "ours (du.UNet)",
    "diffusers": "diffusers UNet2DModel 64x64",
    "same-network": "diffusers-same-network",
}
WHOLE_STEPS = ("trainer", "same-network-trainer", "same-recipe")
ISOLATES = {
    "ours": "our recipe (du.default_configs) trained by du.Trainer, sampled by du.sample: the reference",
    "diffusers-defaults": "diffusers' example as it ships, on a 64x64 UNet2DModel of about our parameter count: "
    "everything at once (stem, recipe, code)",
    "diffusers-best": "the same 64x64 network with our recipe's main choices (cosine, v, EMA, lr 1e-3): mostly the "
    "network stem (we fold 4x4 pixels into channels and run at 16x16)",
    "diffusers-same-network": "diffusers' UNet2DModel shaped like our U-Net on the same pixel-unshuffled input, in our "
    "training step and our sampler: the network implementation alone",
    "diffusers-same-recipe": "that network trained and sampled by diffusers' own parts configured like our recipe: the "
    "whole recipe like for like; against diffusers-same-network, diffusers' training and sampling code alone",
}


# ------------------------------------------------------------------------------------------
# Phases, in the order main() runs them
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Comparison:
    """What every phase shares: the settings, the networks' shapes, the batches, the payload and the report."""

    args: argparse.Namespace
    device: torch.device
    out: Path
    env: dict
    precision: str
    ours_model_config: du.ModelConfig
    ours_train_config: du.TrainConfig
    channels: tuple[int, ...]  # the 64x64 diffusers UNet2DModel's block_out_channels
    layers: int
    attention: bool
    same_config: du.ModelConfig  # the du.ModelConfig diffusers-same-network stands in for
    params: dict[str, int]  # parameters of each network (NETWORK_LABELS' keys)
    batches: list
    payload: dict = dataclasses.field(default_factory=dict)
    sections: list[str] = dataclasses.field(default_factory=list)
    throughput: dict[str, dict] = dataclasses.field(default_factory=dict)
    harness: dict[str, HarnessStep] = dataclasses.field(default_factory=dict)
    flops: dict[str, float] = dataclasses.field(default_factory=dict)  # per training image, for each network
    runs: dict[str, dict] = dataclasses.field(default_factory=dict)  # (b)'s trained runs, for (c)

    @property
    def batch_size(self) -> int:
        return self.ours_train_config.batch_size

    @property
    def recipe_layout(self) -> str:
        return "channels_last" if self.ours_train_config.channels_last else "contiguous"

    def their_net(self) -> nn.Module:
        return diffusers_unet(self.channels, self.layers, self.attention)

    def same_network(self, config: du.ModelConfig | None = None) -> SameNetwork:
        return SameNetwork(config or self.same_config)

    def same_network_trainer(self) -> du.Trainer:
        """du.Trainer around diffusers-same-network: our whole training step on their network."""
        return trainer_with_network(self.same_config, self.ours_train_config, self.device, self.same_network)

    def diffusers_run(self, recipe: DiffusersRecipe, estimated_steps: int) -> DiffusersRun:
        make_net = self.same_network if recipe.network == "same" else lambda: DiffusersNet(self.their_net())
        return DiffusersRun(
            recipe, make_net, self.device, self.precision, self.batch_size, self.args.seed, estimated_steps
        )

    def add_section(self, text: str, blank_before: bool = False) -> None:
        self.sections.append(text)
        print(("\n" if blank_before else "") + text + "\n", flush=True)

    def save(self) -> None:
        bc.save_json(self.out / "vs_diffusers.json", self.payload)
        bc.save_text(self.out / "vs_diffusers.md", "\n\n".join(self.sections))


def parse_rows(text: str) -> list[str]:
    """ "ours,diffusers-same-network" -> those rows, in ROWS' order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(ROWS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--rows takes names from {', '.join(ROWS)}; got {text!r}")
    return [row for row in ROWS if row in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, "runs/benchmarks/vs_diffusers")
    add = parser.add_argument
    add("--parts", default="a,b,c,d", help="which parts to run (default a,b,c,d)")
    add(
        "--rows",
        type=parse_rows,
        default=list(ROWS),
        help=f"which rows to train in (b) and time in (a, c, d) (default all: {','.join(ROWS)}); (a) always "
        "times ours, the reference",
    )
    add("--minutes", type=float, default=10.0, help="(b) training budget per row in minutes (default 10)")
    add("--samples", type=int, default=256, help="(b, c) images drawn per evaluation (default 256)")
    add(
        "--ours-samplers",
        type=bc.parse_samplers,
        default=bc.parse_samplers("ddpm:100,ddim:50"),
        help="(b) sampler:steps list for ours and diffusers-same-network (default ddpm:100,ddim:50)",
    )
    add("--ddim-steps", type=int, default=50, help="(b, c) DDIM steps for every row (default 50)")
    add(
        "--diffusers-ddpm-steps",
        type=int,
        default=0,
        help="(b) also sample the 64x64 diffusers rows with DDPMScheduler at this many steps (0: skip; 1000 is the "
        f"example's); diffusers-same-recipe always samples with it at du.DEFAULT_STEPS ({du.DEFAULT_STEPS})",
    )
    add(
        "--throughput-seconds",
        type=float,
        default=30.0,
        help="(a) seconds of timed training per configuration, split over 3 alternating rounds (default 30)",
    )
    add(
        "--flop-batch",
        type=int,
        default=4,
        help="(a, d) images in the FLOP-counted step (FLOPs scale linearly; default 4)",
    )
    add(
        "--diffusers-channels",
        type=bc.parse_ints,
        help="64x64 UNet2DModel block_out_channels, e.g. 32,32,64 (default: matched to our parameter count)",
    )
    add(
        "--diffusers-layers",
        type=int,
        default=None,
        help="64x64 UNet2DModel layers_per_block (with --diffusers-channels; default 1)",
    )
    add(
        "--no-diffusers-attention",
        action="store_true",
        help="drop the mid-block attention that the 64x64 UNet2DModel has by default",
    )
    add(
        "--defaults-ema",
        action="store_true",
        help="diffusers-defaults with EMA (the example's --use_ema: decay 0.9999, warm-up power 3/4)",
    )
    add(
        "--best-lr",
        type=float,
        default=1e-3,
        help="diffusers-best learning rate (default 1e-3, our recipe's; --lr changes ours only)",
    )
    add("--best-warmup", type=int, default=200, help="diffusers-best warm-up steps (default 200)")
    add("--best-ema", type=float, default=0.999, help="diffusers-best EMAModel max decay (default 0.999)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    args.part_set = set(args.parts.split(","))
    if not args.part_set <= set("abcd"):
        parser.error(f"--parts takes letters from a,b,c,d; got {args.parts!r}")
    return args


def start_comparison(args: argparse.Namespace) -> Comparison:
    """Our recipe for the device, the diffusers networks (sized like ours, shaped like ours), batches and header."""
    device = bc.setup(args)
    env = bc.environment(device)
    env["diffusers"] = diffusers.__version__
    ours_model_config, ours_train_config = bc.apply_overrides(*du.default_configs(device), args)
    attention = not args.no_diffusers_attention
    ours_params = du.count_parameters(du.UNet(ours_model_config))
    if args.diffusers_channels:
        channels, layers = tuple(args.diffusers_channels), args.diffusers_layers or 1
        with torch.device("meta"):
            their_params = du.count_parameters(diffusers_unet(channels, layers, attention))
    else:
        channels, layers, their_params = match_diffusers_config(ours_params, attention)
    same_config = same_network_config(ours_model_config)
    with torch.device("meta"):
        same_params = du.count_parameters(SameNetwork(same_config))
    comparison = Comparison(
        args=args,
        device=device,
        out=bc.prepare_out(args.out),
        env=env,
        precision=du.choose_precision(device),
        ours_model_config=ours_model_config,
        ours_train_config=ours_train_config,
        channels=channels,
        layers=layers,
        attention=attention,
        same_config=same_config,
        params={"ours": ours_params, "diffusers": their_params, "same-network": same_params},
        batches=list(itertools.islice(du.training_batches(ours_train_config.batch_size, args.seed), 4)),
    )
    print_header(comparison)
    comparison.payload = {
        "benchmark": "vs_diffusers",
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if k != "part_set"},
        "ours": {"model": ours_model_config, "train": ours_train_config, "parameters": ours_params},
        "diffusers_unet": {
            "block_out_channels": channels,
            "layers_per_block": layers,
            "mid_attention": attention,
            "parameters": their_params,
        },
        "diffusers_same_network": {
            "stands_in_for": same_config,
            "unet2dmodel_config": dict(SameNetwork(same_config).unet.config),
            "parameters": same_params,
            "differences": same_network_notes(ours_model_config),
        },
        "batch_size": ours_train_config.batch_size,
        "precision": comparison.precision,
    }
    comparison.sections = [
        f"# Ours vs diffusers {diffusers.__version__}",
        bc.environment_line(env),
        what_each_row_isolates(comparison),
    ]
    return comparison


def print_header(c: Comparison) -> None:
    print(f"# Ours vs diffusers {diffusers.__version__}\n{bc.environment_line(c.env)}", flush=True)
    ours = c.params["ours"]
    ratio = c.params["diffusers"] / ours
    if not 0.85 <= ratio <= 1.15:
        print(f"warning: the 64x64 diffusers network has {ratio:.2f}x our parameters (outside 0.85-1.15)", flush=True)
    theirs = (
        f"diffusers UNet2DModel 64x64: block_out_channels={c.channels}, layers_per_block={c.layers}, "
        f"mid-block attention {c.attention}, {c.params['diffusers']:,} parameters ({ratio:.2f}x ours)"
    )
    unet = SameNetwork(c.same_config).unet.config
    same = (
        f"diffusers-same-network: PixelUnshuffle({c.same_config.pixel_unshuffle}) -> UNet2DModel(sample_size="
        f"{unet.sample_size}, in/out channels {unet.in_channels}, block_out_channels={tuple(unet.block_out_channels)}, "
        f"layers_per_block={unet.layers_per_block}, mid attention {unet.add_attention} with attention_head_dim "
        f"{unet.attention_head_dim}, norm_num_groups={unet.norm_num_groups}) -> PixelShuffle, "
        f"{c.params['same-network']:,} parameters ({c.params['same-network'] / ours:.2f}x ours)"
    )
    setting = f"batch {c.batch_size}, precision {c.precision}"
    print(f"ours: {du.describe_model(du.UNet(c.ours_model_config))}\n{theirs}\n{same}; {setting}\n", flush=True)


def what_each_row_isolates(c: Comparison) -> str:
    lines = ["## What each row isolates", ""]
    lines += [f"- **{row}**: {ISOLATES[row]}" + ("" if row in c.args.rows else " (not run)") for row in ROWS]
    differences = "; ".join(same_network_notes(c.ours_model_config))
    lines += [
        "",
        f"diffusers-same-network is as close to our U-Net as UNet2DModel allows ({c.params['same-network']:,} "
        f"parameters against our {c.params['ours']:,}); it differs in that {differences}.",
    ]
    return "\n".join(lines)


def build_throughput_steps(c: Comparison) -> dict[str, Callable]:
    """The shared step for each network in each layout, then each row's whole training step."""
    rows = c.args.rows
    networks = {"ours": lambda: du.UNet(c.ours_model_config)}
    if {"diffusers-defaults", "diffusers-best"} & set(rows):
        networks["diffusers"] = lambda: DiffusersNet(c.their_net())
    if {"diffusers-same-network", "diffusers-same-recipe"} & set(rows):  # also what the FLOP count needs
        networks["same-network"] = c.same_network
    if c.device.type == "cpu":
        layouts = [False, True]
    else:
        layouts = [False, True] if c.ours_train_config.channels_last else [False]
    steps: dict[str, Callable] = {}
    for layout in layouts:
        tag = "channels_last" if layout else "contiguous"
        for name, make in networks.items():
            torch.manual_seed(c.args.seed)
            steps[f"{name}|{tag}"] = HarnessStep(make(), c.device, c.precision, layout, c.args.seed)
    layout = c.recipe_layout
    trainer = du.Trainer(c.ours_model_config, c.ours_train_config, device=c.device)
    steps[f"trainer|{layout}"] = lambda batch: trainer.train_step(*batch)
    if "diffusers-same-network" in rows:
        same_trainer = c.same_network_trainer()
        steps[f"same-network-trainer|{layout}"] = lambda batch: same_trainer.train_step(*batch)
    if "diffusers-same-recipe" in rows:
        steps[f"same-recipe|{layout}"] = c.diffusers_run(same_recipe(c), 1000).train_step
    return steps


def training_throughput(c: Comparison) -> None:
    """(a) images/s of the shared step on each network and of each row's whole step, timed in alternating rounds;
    FLOPs per training image of each network (also what (d) needs)."""
    parts, args = c.args.part_set, c.args
    seconds = args.throughput_seconds if "a" in parts else max(3.0, args.throughput_seconds / 3)
    steps = build_throughput_steps(c)
    c.harness = {k: v for k, v in steps.items() if isinstance(v, HarnessStep)}
    print(f"(a) timing training steps: {len(steps)} configurations x {seconds:.0f} s ...", flush=True)
    c.throughput = bc.measure_throughput(steps, c.batches, c.device, seconds)
    count_flops(c)
    rows = [throughput_row(c, key, result) for key, result in c.throughput.items()]
    c.payload["throughput"] = rows
    c.payload["flops_per_training_image"] = c.flops
    ratios, lines = throughput_ratios(c)
    c.payload["throughput_ratios"] = ratios
    table = bc.markdown_table(rows, THROUGHPUT_COLUMNS)
    c.add_section(f"## (a) Training throughput (batch {c.batch_size}, {c.precision})\n\n{table}\n\n" + "\n".join(lines))
    c.save()


def count_flops(c: Comparison) -> None:
    """FLOPs of one forward + backward per training image, for each network (on its shared step; layout-free)."""
    x0 = c.batches[0][0][: c.args.flop_batch]
    for key, step in c.harness.items():
        network = NETWORK_OF[key.split("|")[0]]
        if network not in c.flops:
            c.flops[network] = bc.training_flops_per_image(lambda s=step: s.loss(x0), len(x0))
            step.optimizer.zero_grad(set_to_none=True)
    counts = ", ".join(
        f"{NETWORK_LABELS[n]} {c.params[n]:,} parameters, {f / 1e9:.3f} GFLOP" for n, f in c.flops.items()
    )
    print(f"per training image (forward + backward): {counts}", flush=True)


def throughput_row(c: Comparison, key: str, result: dict) -> dict:
    name, layout = key.split("|")
    network = NETWORK_OF[name]
    row = {
        "key": key,
        "name": STEP_LABELS[name],
        "layout": layout,
        "parameters": c.params[network],
        "gflops_per_image": c.flops.get(network, math.nan) / 1e9,
        **result,
    }
    reference = c.throughput.get(f"{'trainer' if name in WHOLE_STEPS else 'ours'}|{layout}")
    row["ours_speedup"] = reference["images_per_s"] / result["images_per_s"] if reference else math.nan
    return row


def best_rate(c: Comparison, name: str) -> float:
    """images/s of a step in its faster layout."""
    return max(r["images_per_s"] for k, r in c.throughput.items() if k.split("|")[0] == name)


def throughput_ratios(c: Comparison) -> tuple[dict[str, float], list[str]]:
    """Ours against each diffusers network (shared step) and each whole step, as numbers and as report lines."""
    ratios, lines = {}, []
    ours = best_rate(c, "ours")
    for network, label in (("diffusers", "the 64x64 UNet2DModel"), ("same-network", "diffusers-same-network")):
        if f"{network}|contiguous" not in c.throughput:
            continue
        ratio = ours / best_rate(c, network)
        flops = c.flops[network] / c.flops["ours"]
        ratios[f"ours/{network}"] = ratio
        ratios[f"ours/{network}_achieved_flops"] = ratio / flops  # (our FLOPs x our rate) / (theirs x theirs)
        lines.append(
            f"- ours / {label}, shared step, each in its faster layout: **{ratio:.2f}x** images/s; "
            f"{c.params[network]:,} vs our {c.params['ours']:,} parameters, {c.flops[network] / 1e9:.3f} vs "
            f"{c.flops['ours'] / 1e9:.3f} GFLOP per training image ({flops:.2f}x ours); achieved FLOP/s, ours / "
            f"theirs: {ratio / flops:.2f}x"
        )
    trainer = c.throughput[f"trainer|{c.recipe_layout}"]["images_per_s"]
    for name, label in (
        ("same-network-trainer", "diffusers-same-network in our whole step (du.Trainer.train_step)"),
        ("same-recipe", "diffusers-same-recipe, diffusers' whole step"),
    ):
        key = f"{name}|{c.recipe_layout}"
        if key in c.throughput:
            ratios[f"trainer/{name}"] = trainer / c.throughput[key]["images_per_s"]
            lines.append(
                f"- ours (du.Trainer.train_step) / {label}, {c.recipe_layout}: **{ratios[f'trainer/{name}']:.2f}x**"
            )
    return ratios, lines


def quality_at_equal_time(c: Comparison) -> None:
    """(b) Each row trains for --minutes, then draws --samples images scored by du.evaluate_samples."""
    print(f"(b) training {', '.join(c.args.rows)} for {c.args.minutes} min each ...", flush=True)
    quality_rows: list[dict] = []
    recipes = diffusers_recipes(c)
    c.payload["diffusers_recipes"] = recipes
    c.payload["estimated_diffusers_steps"] = {}
    for row in c.args.rows:
        if row == "ours":
            trainer = du.Trainer(c.ours_model_config, c.ours_train_config, device=c.device)
            train_with_our_step(c, row, trainer, "du.sample", quality_rows)
        elif row == "diffusers-same-network":
            train_with_our_step(c, row, c.same_network_trainer(), "du.sample", quality_rows)
        else:
            recipe = recipes[row]
            estimated_steps = estimate_diffusers_steps(c, recipe)
            c.payload["estimated_diffusers_steps"][row] = estimated_steps
            train_diffusers(c, recipe, estimated_steps, quality_rows)
        c.payload["quality"] = quality_rows
        c.save()
    table = bc.markdown_table(quality_rows, QUALITY_COLUMNS)
    heading = f"## (b) Quality after {c.args.minutes} min of training each (batch {c.batch_size}, {c.precision})"
    c.add_section(f"{heading}\n\n{table}", blank_before=True)
    c.save()


def train_with_our_step(c: Comparison, name: str, trainer: du.Trainer, code: str, quality_rows: list[dict]) -> None:
    """A du.Trainer (ours, or around diffusers-same-network) for --minutes, sampled (unconditionally) with du.sample
    by each of --ours-samplers and DDIM --ddim-steps."""
    args = c.args
    _, train_seconds = bc.timed(lambda: trainer.train(minutes=args.minutes, progress=False), c.device)
    c.runs[name] = {"trainer": trainer}
    for sampler, steps_count in dict.fromkeys(args.ours_samplers + [("ddim", args.ddim_steps)]):
        metrics, images = bc.sample_and_evaluate(
            trainer.sampling_model, trainer.schedule, args.samples, sampler, steps_count, c.device, batch_size=256
        )
        row = {
            "run": name,
            "steps_trained": trainer.step,
            "images_seen": trainer.images_seen,
            "train_seconds": train_seconds,
            "loss": bc.mean_tail(trainer.losses),
            "implementation": code,
            **metrics,
        }
        quality_rows.append(row)
        if sampler == "ddim" and steps_count == args.ddim_steps:
            c.runs[name]["ddim_row"] = row
        title = f"{name}, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"
        bc.save_figure(du.plot_grid(images[:32], title=title), c.out / f"samples_{name}_{sampler}{steps_count}.png")
        print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)


def estimate_diffusers_steps(c: Comparison, recipe: DiffusersRecipe) -> int:
    """How many steps a diffusers run will take in --minutes (their cosine lr schedule needs its length).

    From (a)'s throughput: the shared step on the 64x64 network in contiguous layout for the 64x64 recipes (their
    loop is the same work), diffusers-same-recipe's own step; a 5-second probe when (a) did not time it.
    """
    if recipe.network == "same":
        rate = c.throughput.get(f"same-recipe|{c.recipe_layout}", {}).get("images_per_s")
    else:
        rate = c.throughput.get("diffusers|contiguous", {}).get("images_per_s")
    if rate is None:
        if recipe.network == "same":
            step = c.diffusers_run(recipe, 1000).train_step
        else:
            step = HarnessStep(DiffusersNet(c.their_net()), c.device, c.precision, False, c.args.seed)
        rate = bc.measure_throughput({"probe": step}, c.batches, c.device, 5.0, rounds=1)["probe"]["images_per_s"]
    return max(1, round(rate * c.args.minutes * 60 / c.batch_size))


def same_recipe(c: Comparison) -> DiffusersRecipe:
    """diffusers-same-recipe: diffusers' own parts set to our recipe's values (from our configs, overrides included)."""
    model, train = c.same_config, c.ours_train_config
    return DiffusersRecipe(
        "diffusers-same-recipe",
        beta_schedule={"cosine": "squaredcos_cap_v2", "linear": "linear"}[model.schedule],
        prediction_type={"v": "v_prediction", "eps": "epsilon"}[model.prediction],
        lr=train.lr,
        warmup_steps=train.warmup_steps,
        lr_schedule="cosine" if train.lr_schedule == "cosine" else "constant_with_warmup",
        ema_decay=train.ema_decay,
        adam_betas=(0.9, 0.999),  # torch's AdamW defaults, which du.Trainer keeps
        weight_decay=train.weight_decay,
        adam_eps=1e-8,
        grad_clip=train.grad_clip,
        network="same",
        ema_warmup="ours",
        ema_foreach=True,
        min_snr_gamma=train.min_snr_gamma,
        min_snr_form=train.min_snr_form,
        num_train_timesteps=model.num_timesteps,
        timestep_spacing="linspace",  # linspace(0, T - 1, steps) rounded: du's "time" spacing
        channels_last=train.channels_last,
        ddpm_steps=du.DEFAULT_STEPS,
    )


def diffusers_recipes(c: Comparison) -> dict[str, DiffusersRecipe]:
    args = c.args
    defaults_ema = 0.9999 if args.defaults_ema else None
    recipes = [
        DiffusersRecipe("diffusers-defaults", "linear", "epsilon", 1e-4, 500, "cosine", defaults_ema),
        DiffusersRecipe(
            "diffusers-best",
            "squaredcos_cap_v2",
            "v_prediction",
            args.best_lr,
            args.best_warmup,
            "constant_with_warmup",
            args.best_ema,
        ),
        same_recipe(c),
    ]
    return {recipe.name: recipe for recipe in recipes}


def train_diffusers(c: Comparison, recipe: DiffusersRecipe, estimated_steps: int, quality_rows: list[dict]) -> None:
    """One diffusers recipe for --minutes, sampled with DDPMScheduler (if the recipe or --diffusers-ddpm-steps asks)
    and DDIMScheduler."""
    args = c.args
    run = c.diffusers_run(recipe, estimated_steps)
    _, train_seconds = bc.timed(lambda: run.train(args.minutes), c.device)
    c.runs[recipe.name] = {"run": run}
    ddpm_steps = args.diffusers_ddpm_steps if recipe.ddpm_steps is None else recipe.ddpm_steps
    samplers = ([("ddpm", ddpm_steps)] if ddpm_steps else []) + [("ddim", args.ddim_steps)]
    for sampler, steps_count in samplers:
        metrics, images = diffusers_samples(c, run, sampler, steps_count)
        row = {
            "run": recipe.name,
            "steps_trained": run.step,
            "images_seen": run.images_seen,
            "train_seconds": train_seconds,
            "loss": bc.mean_tail(run.losses),
            **metrics,
        }
        quality_rows.append(row)
        if sampler == "ddim":
            c.runs[recipe.name]["ddim_row"] = row
        title = f"{recipe.name}, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"
        path = c.out / f"samples_{recipe.name}_{sampler}{steps_count}.png"
        bc.save_figure(du.plot_grid(images[:32], title=title), path)
        print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)


def diffusers_samples(c: Comparison, run: DiffusersRun, sampler: str, steps: int) -> tuple[dict, torch.Tensor]:
    """--samples images from a diffusers run with their scheduler, timed and scored (as bc.sample_and_evaluate)."""
    images, seconds = bc.timed(lambda: run.sample(c.args.samples, sampler, steps), c.device)
    metrics = {
        "implementation": f"diffusers {'DDIMScheduler' if sampler == 'ddim' else 'DDPMScheduler'}",
        "sampler": sampler,
        "steps": steps,
        "sample_seconds": seconds,
        "images_per_s": c.args.samples / seconds,
        **du.evaluate_samples(images),
    }
    return metrics, images


def sampling_time(c: Comparison) -> None:
    """(c) Seconds for --samples images at --ddim-steps DDIM steps: (b)'s models, or untrained ones without (b)."""
    if c.runs:
        rows = [{**run["ddim_row"], "trained": f"{c.args.minutes} min"} for run in c.runs.values() if "ddim_row" in run]
    else:
        rows = sample_untrained(c)
    c.payload["sampling"] = rows
    table = bc.markdown_table(rows, SAMPLING_COLUMNS)
    c.add_section(f"## (c) Sampling {c.args.samples} images with {c.args.ddim_steps} DDIM steps\n\n{table}")
    c.save()


def sample_untrained(c: Comparison) -> list[dict]:
    """(c) without (b): each chosen row's network untrained, with its sampler code (du.sample or DDIMScheduler)."""
    args, rows = c.args, []
    print(f"(c) sampling untrained networks ({args.samples} images, DDIM {args.ddim_steps}) ...", flush=True)
    schedule = du.NoiseSchedule.from_config(c.ours_model_config)
    untrained = [("ours", lambda: du.UNet(c.ours_model_config))]
    if "diffusers-same-network" in args.rows:
        untrained.append(("diffusers-same-network", c.same_network))
    for name, make in untrained:
        torch.manual_seed(args.seed)
        metrics, _ = bc.sample_and_evaluate(
            make().to(c.device), schedule, args.samples, "ddim", args.ddim_steps, c.device
        )
        rows.append({"run": name, "implementation": "du.sample", "trained": "no", **metrics})
    runs = []
    if {"diffusers-defaults", "diffusers-best"} & set(args.rows):
        runs.append(("diffusers 64x64", DiffusersRecipe("diffusers", "linear", "epsilon", 1e-4, 0, "constant", None)))
    if "diffusers-same-recipe" in args.rows:
        runs.append(("diffusers-same-recipe", same_recipe(c)))
    for name, recipe in runs:
        metrics, _ = diffusers_samples(c, c.diffusers_run(recipe, 1), "ddim", args.ddim_steps)
        rows.append({"run": name, "trained": "no", **metrics})
    return rows


def hardware_efficiency(c: Comparison) -> None:
    """(d) FLOPs per training image x images/s from (a), as a share of a measured torch.mm rate."""
    print("(d) timing torch.mm ...", flush=True)
    mm_fp32 = bc.matmul_flops_per_second(c.device, torch.float32)
    if c.precision == "fp32":
        mm_train = mm_fp32
    else:
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float16
        mm_train = bc.matmul_flops_per_second(c.device, dtype)
    names = dict.fromkeys(key.split("|")[0] for key in c.throughput)
    flop_rows = [flop_row(c, name, mm_fp32, mm_train) for name in names]
    tf32 = c.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32  # du.Trainer turns TF32 on for CUDA
    c.payload["flops"] = {
        "rows": flop_rows,
        "mm_fp32_gflops": mm_fp32 / 1e9,
        "mm_train_precision_gflops": mm_train / 1e9,
        "tf32": tf32,
    }
    table = bc.markdown_table(flop_rows, FLOP_COLUMNS)
    rates = f"{mm_fp32 / 1e9:.1f} GFLOP/s fp32{' (TF32 on)' if tf32 else ''}"
    if c.precision != "fp32":
        rates += f", {mm_train / 1e9:.1f} GFLOP/s {c.precision}"
    c.add_section(
        f"## (d) Hardware efficiency\n\nmeasured square torch.mm: {rates} on {c.env['device_name']}; "
        "FLOPs = matmul/conv multiply-adds x 2 (FlopCounterMode), forward + backward, counted in (a); a whole step's "
        f"EMA, optimiser and loss weighting add no matmuls\n\n{table}"
    )
    c.save()


def flop_row(c: Comparison, name: str, mm_fp32: float, mm_train: float) -> dict:
    """One timed step (in its faster layout): its network's FLOPs per training image x its images/s from (a)."""
    keys = [k for k in c.throughput if k.split("|")[0] == name]
    best_key = max(keys, key=lambda k: c.throughput[k]["images_per_s"])
    network = NETWORK_OF[name]
    rate = c.throughput[best_key]["images_per_s"]
    achieved = c.flops[network] * rate
    return {
        "name": f"{STEP_LABELS[name]}, {best_key.split('|')[1]}",
        "parameters": c.params[network],
        "gflops_per_image": c.flops[network] / 1e9,
        "images_per_s": rate,
        "achieved_gflops": achieved / 1e9,
        "share_fp32": achieved / mm_fp32,
        "share_train_precision": achieved / mm_train,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if diffusers is None:
        print(
            "vs_diffusers.py needs diffusers: pip install -r benchmarks/requirements-diffusers.txt "
            "(keep the installed torch)",
            file=sys.stderr,
        )
        return 2
    diffusers.utils.logging.set_verbosity_error()
    comparison = start_comparison(args)
    if args.part_set & {"a", "d"}:
        training_throughput(comparison)
    if "b" in args.part_set:
        quality_at_equal_time(comparison)
    if "c" in args.part_set:
        sampling_time(comparison)
    if "d" in args.part_set:
        hardware_efficiency(comparison)
    comparison.save()
    print(f"saved {comparison.out / 'vs_diffusers.json'} and vs_diffusers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
