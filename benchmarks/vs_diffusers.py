"""Side by side with Hugging Face diffusers: training speed, and quality at equal wall-clock time.

Same data (du.training_batches, same seed), device, batch size (our recipe's unless --batch-size) and precision
(du.choose_precision) for every row. Five rows (--rows picks which of them train):
  ours                    du.default_configs(device) via du.Trainer, sampled with du.sample (unconditionally)
  diffusers-defaults      diffusers' example recipe (examples/unconditional_image_generation/train_unconditional.py
                          defaults: DDPMScheduler(1000, "linear", "epsilon"), AdamW lr 1e-4, betas (0.95, 0.999),
                          weight decay 1e-6, cosine lr with 500 warm-up steps, grad clip 1, no EMA) on a
                          full-resolution (64x64) UNet2DModel of about our parameter count
  diffusers-best          the same network with the recipe's main choices (squaredcos_cap_v2, v_prediction, EMAModel
                          0.999, lr 1e-3 after 200 warm-up steps, then constant)
  diffusers-same-network  PixelUnshuffle -> UNet2DModel shaped like our U-Net (our widths, blocks, attention heads,
                          time embedding) -> PixelShuffle, trained by du.Trainer and sampled by du.sample: only the
                          network differs (UNet2DModel keeps more skips and resnets per up level; no request input)
  diffusers-same-recipe   that network trained and sampled by diffusers' own parts configured like our recipe
                          (DDPMScheduler for add_noise and get_velocity, our min-SNR weight from compute_snr,
                          EMAModel with our decay and warm-up, get_scheduler with our warm-up and lr schedule), sampled
                          with DDPMScheduler at du.DEFAULT_STEPS and DDIMScheduler

(a) Training speed: images/s of a shared step (du.diffusion_loss with the eps target, backward, grad clip, AdamW) on
    each network in both layouts, and of each row's whole training step; FLOPs per training image (FlopCounterMode)
    and the achieved GFLOP/s as a share of a measured fp32 torch.mm rate.
(b) Quality after --minutes of training each (evaluation not counted): --samples images scored by
    du.evaluate_samples; ours and diffusers-same-network with --ours-samplers, the rest with diffusers' DDIMScheduler
    at --ddim-steps. The diffusers cosine lr schedules need a step count: estimated from (a)'s images/s.

Needs diffusers: pip install -r benchmarks/requirements-diffusers.txt (keep the installed torch).

The tables of RESULTS.md (about 25 minutes on the 2-core CPU):
    python benchmarks/vs_diffusers.py --minutes 2 --throughput-seconds 15 --out benchmarks/results/vs_diffusers
Smoke test (under a minute):
    python benchmarks/vs_diffusers.py --minutes 0.05 --samples 8 --throughput-seconds 2 --ours-samplers ddim:5 \\
        --ddim-steps 5 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1 --out /tmp/vs_smoke
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import sys
import time
import unittest.mock
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as bc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import diffusion_utils as du  # noqa: E402

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
except ImportError:  # main() says how to install it
    diffusers = None

OUR_UNET = du.UNet  # trainer_with_network stands another network in for du.UNet while a Trainer is built
ROWS = ("ours", "diffusers-defaults", "diffusers-best", "diffusers-same-network", "diffusers-same-recipe")
# (a)'s timed steps: name -> (label, network). The shared step runs on each network; the whole steps are each row's
# own training step, compared with ours (du.Trainer.train_step).
STEPS = {
    "ours": ("ours (du.UNet), shared step", "ours"),
    "diffusers": ("diffusers UNet2DModel 64x64, shared step", "diffusers"),
    "same-network": ("diffusers-same-network, shared step", "same-network"),
    "trainer": ("ours, whole du.Trainer.train_step", "ours"),
    "same-network-trainer": ("diffusers-same-network, whole du.Trainer.train_step", "same-network"),
    "same-recipe": ("diffusers-same-recipe, whole diffusers step", "same-network"),
}
WHOLE_STEPS = ("trainer", "same-network-trainer", "same-recipe")
THROUGHPUT_COLUMNS = [
    ("name", "network / step", ""),
    ("parameters", "parameters", ","),
    ("gflops_per_image", "GFLOP / training image", ".3f"),
    ("layout", "layout", ""),
    ("images_per_s", "images/s", ".1f"),
    ("ours_speedup", "ours / this (same kind of step, layout)", ".2f"),
    ("achieved_gflops", "achieved GFLOP/s", ".1f"),
    ("share_of_mm", "share of fp32 mm", "%"),
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


def same_recipe(s: Setup) -> DiffusersRecipe:
    """diffusers-same-recipe: diffusers' own parts set to our recipe's values (from our configs, overrides included)."""
    model, train = s.same_config, s.train
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


# ------------------------------------------------------------------------------------------
# Phases, in the order main() runs them
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What every phase shares: the settings, our configs, the diffusers networks' shapes and the batches."""

    args: object
    device: torch.device
    precision: str
    model: du.ModelConfig  # ours
    train: du.TrainConfig  # ours
    same_config: du.ModelConfig  # the du.ModelConfig diffusers-same-network stands in for (unconditional)
    channels: tuple[int, ...]  # the 64x64 UNet2DModel's block_out_channels
    layers: int
    params: dict[str, int]  # parameters of each network: ours, diffusers, same-network
    batches: list

    @property
    def layout(self) -> str:
        return "channels_last" if self.train.channels_last else "contiguous"

    def their_net(self) -> nn.Module:
        return DiffusersNet(diffusers_unet(self.channels, self.layers, True))

    def same_network(self, config: du.ModelConfig | None = None) -> SameNetwork:
        return SameNetwork(config or self.same_config)

    def same_network_trainer(self) -> du.Trainer:
        return trainer_with_network(self.same_config, self.train, self.device, self.same_network)

    def diffusers_run(self, recipe: DiffusersRecipe, estimated_steps: int) -> DiffusersRun:
        make_net = self.same_network if recipe.network == "same" else self.their_net
        batch, seed = self.train.batch_size, self.args.seed
        return DiffusersRun(recipe, make_net, self.device, self.precision, batch, seed, estimated_steps)


def parse_rows(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or names - set(ROWS):
        raise ValueError(f"--rows takes names from {', '.join(ROWS)}")
    return [row for row in ROWS if row in names]


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/vs_diffusers")
    add = parser.add_argument
    add("--rows", type=parse_rows, default=list(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    add("--minutes", type=float, default=10.0, help="(b) training budget per row in minutes (default 10)")
    add("--samples", type=int, default=256, help="(b) images drawn per evaluation (default 256)")
    add(
        "--ours-samplers",
        type=bc.parse_samplers,
        default=bc.parse_samplers("ddpm:100,ddim:50"),
        help="(b) sampler:steps for ours and diffusers-same-network (default ddpm:100,ddim:50)",
    )
    add("--ddim-steps", type=int, default=50, help="(b) DDIMScheduler steps for the diffusers rows (default 50)")
    add("--throughput-seconds", type=float, default=30.0, help="(a) timed seconds per step (default 30)")
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def start(args) -> Setup:
    """Our recipe for the device, the diffusers networks (sized like ours, shaped like ours) and the batches."""
    device = bc.setup(args)
    model, train = bc.apply_overrides(*du.default_configs(device), args)
    ours = du.count_parameters(du.UNet(model))
    channels, layers, theirs = match_diffusers_config(ours, True)
    same_config = dataclasses.replace(model, conditional=False)  # UNet2DModel has no place for a request
    with torch.device("meta"):
        same = du.count_parameters(SameNetwork(same_config))
    batches = list(itertools.islice(du.training_batches(train.batch_size, args.seed), 4))
    params = {"ours": ours, "diffusers": theirs, "same-network": same}
    return Setup(
        args, device, du.choose_precision(device), model, train, same_config, channels, layers, params, batches
    )


def throughput_steps(s: Setup) -> dict[str, Callable]:
    """ "name|layout" -> step: the shared step for each network in each layout, then each row's whole step."""
    networks = {"ours": lambda: du.UNet(s.model)}
    if {"diffusers-defaults", "diffusers-best"} & set(s.args.rows):
        networks["diffusers"] = s.their_net
    if {"diffusers-same-network", "diffusers-same-recipe"} & set(s.args.rows):
        networks["same-network"] = s.same_network
    steps: dict[str, Callable] = {}
    for channels_last in (False, True):
        for name, make in networks.items():
            torch.manual_seed(s.args.seed)
            tag = "channels_last" if channels_last else "contiguous"
            steps[f"{name}|{tag}"] = HarnessStep(make(), s.device, s.precision, channels_last, s.args.seed)
    trainer = du.Trainer(s.model, s.train, device=s.device)
    steps[f"trainer|{s.layout}"] = lambda batch: trainer.train_step(*batch)
    if "diffusers-same-network" in s.args.rows:
        same_trainer = s.same_network_trainer()
        steps[f"same-network-trainer|{s.layout}"] = lambda batch: same_trainer.train_step(*batch)
    if "diffusers-same-recipe" in s.args.rows:
        steps[f"same-recipe|{s.layout}"] = s.diffusers_run(same_recipe(s), 1000).train_step
    return steps


def training_throughput(s: Setup) -> tuple[list[dict], dict[str, float]]:
    """(a) The rows (images/s, FLOPs, the achieved share of a torch.mm rate) and {"name|layout": images/s}."""
    steps = throughput_steps(s)
    print(f"(a) timing {len(steps)} training steps x {s.args.throughput_seconds:g} s ...", flush=True)
    rates = {
        k: r["images_per_s"]
        for k, r in bc.measure_throughput(steps, s.batches, s.device, s.args.throughput_seconds).items()
    }
    flops = {}
    x0 = s.batches[0][0][:4]
    for key, step in steps.items():
        network = STEPS[key.split("|")[0]][1]
        if isinstance(step, HarnessStep) and network not in flops:
            flops[network] = bc.training_flops_per_image(lambda step=step: step.loss(x0), len(x0))
            step.optimizer.zero_grad(set_to_none=True)
    mm = bc.matmul_flops_per_second(s.device)
    rows = []
    for key, rate in rates.items():
        name, layout = key.split("|")
        label, network = STEPS[name]
        reference = rates.get(f"{'trainer' if name in WHOLE_STEPS else 'ours'}|{layout}", math.nan)
        achieved = flops[network] * rate
        rows.append(
            {
                "key": key,
                "name": label,
                "layout": layout,
                "parameters": s.params[network],
                "gflops_per_image": flops[network] / 1e9,
                "images_per_s": rate,
                "ours_speedup": reference / rate,
                "achieved_gflops": achieved / 1e9,
                "share_of_mm": achieved / mm,
            }
        )
    return rows, rates, mm


def diffusers_recipes(s: Setup) -> dict[str, DiffusersRecipe]:
    recipes = [
        DiffusersRecipe("diffusers-defaults", "linear", "epsilon", 1e-4, 500, "cosine", None),
        DiffusersRecipe(
            "diffusers-best", "squaredcos_cap_v2", "v_prediction", 1e-3, 200, "constant_with_warmup", 0.999
        ),
        same_recipe(s),
    ]
    return {recipe.name: recipe for recipe in recipes}


def quality_at_equal_time(s: Setup, rates: dict[str, float]) -> list[dict]:
    """(b) Each row trains for --minutes, then draws --samples images per sampler, scored by du.evaluate_samples."""
    args, rows = s.args, []
    recipes = diffusers_recipes(s)
    for name in args.rows:
        print(f"(b) training {name} for {args.minutes:g} min ...", flush=True)
        if name in ("ours", "diffusers-same-network"):
            trainer = du.Trainer(s.model, s.train, device=s.device) if name == "ours" else s.same_network_trainer()
            trainer.train(minutes=args.minutes, progress=False)
            run = {"run": name, "steps_trained": trainer.step, "images_seen": trainer.images_seen}
            run["loss"] = bc.mean_tail(trainer.losses)
            for sampler, steps in args.ours_samplers:
                metrics, images = bc.sample_and_evaluate(
                    trainer.sampling_model, trainer.schedule, args.samples, sampler, steps, s.device
                )
                rows.append({**run, "implementation": "du.sample", **metrics})
                save_grid(s, rows[-1], images)
            continue
        recipe = recipes[name]
        key = f"same-recipe|{s.layout}" if recipe.network == "same" else "diffusers|contiguous"
        estimated = round(rates.get(key, 100.0) * args.minutes * 60 / s.train.batch_size)
        trained = s.diffusers_run(recipe, max(1, estimated))
        trained.train(args.minutes)
        run = {"run": name, "steps_trained": trained.step, "images_seen": trained.images_seen}
        run["loss"] = bc.mean_tail(trained.losses)
        for sampler, steps in ([("ddpm", recipe.ddpm_steps)] if recipe.ddpm_steps else []) + [
            ("ddim", args.ddim_steps)
        ]:
            images, seconds = bc.timed(lambda r=trained, k=sampler, n=steps: r.sample(args.samples, k, n), s.device)
            code = f"diffusers {'DDIMScheduler' if sampler == 'ddim' else 'DDPMScheduler'}"
            metrics = {"sampler": sampler, "steps": steps, "sample_seconds": seconds, **du.evaluate_samples(images)}
            rows.append({**run, "implementation": code, **metrics})
            save_grid(s, rows[-1], images)
    return rows


def save_grid(s: Setup, row: dict, images: torch.Tensor) -> None:
    print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)
    title = f"{row['run']}, {row['sampler']} {row['steps']}: valid {100 * row['valid']:.0f}%"
    path = Path(s.args.out) / f"samples_{row['run']}_{row['sampler']}{row['steps']}.png"
    du.save_figure(du.plot_grid(images[:32], title=title), path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if diffusers is None:
        print("vs_diffusers.py needs diffusers: pip install -r benchmarks/requirements-diffusers.txt", file=sys.stderr)
        return 2
    diffusers.utils.logging.set_verbosity_error()
    s = start(args)
    out, env = bc.prepare_out(args.out), bc.environment(s.device, __file__)
    env["diffusers"] = diffusers.__version__
    print(bc.environment_line(env), flush=True)
    throughput, rates, mm = training_throughput(s)
    print(bc.markdown_table(throughput, THROUGHPUT_COLUMNS), flush=True)
    quality = quality_at_equal_time(s, rates)
    setting = f"batch {s.train.batch_size}, {s.precision}"
    sections = [
        f"ours: {du.describe_model(du.UNet(s.model))}; diffusers 64x64: block_out_channels={s.channels}, "
        f"layers_per_block={s.layers}; {setting}",
        f"## (a) Training throughput (fp32 torch.mm: {mm / 1e9:.0f} GFLOP/s)\n\n"
        + bc.markdown_table(throughput, THROUGHPUT_COLUMNS),
        f"## (b) Quality after {args.minutes:g} min of training each\n\n" + bc.markdown_table(quality, QUALITY_COLUMNS),
    ]
    payload = {"ours": {"model": s.model, "train": s.train}, "parameters": s.params, "throughput": throughput}
    payload |= {"mm_fp32_gflops": mm / 1e9, "quality": quality}
    bc.write_report(out, "vs_diffusers", f"Ours vs diffusers {diffusers.__version__}", env, sections, **payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
