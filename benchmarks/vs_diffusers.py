"""Ours against Hugging Face diffusers: training speed, and quality at equal wall-clock time (RESULTS.md, "Against
Hugging Face diffusers").

Same data, device, batch and precision for every row; each row takes one difference out:
  ours                    du.default_configs(device, "diffusion") in du.Trainer, sampled with du.sample
                          (unconditionally)
  diffusers-defaults      diffusers' train_unconditional.py recipe on a 64x64 UNet2DModel of about our size
  diffusers-best          that network with the recipe's main choices (cosine, v target, EMA, lr 1e-3)
  diffusers-same-network  a UNet2DModel shaped like our U-Net on the same pixel-unshuffled input, in du.Trainer
  diffusers-same-recipe   that network with diffusers' schedulers, compute_snr and EMAModel, set like our recipe
(a) images/s of a shared step on each network and of each row's whole step, FLOPs per image and the share of an
fp32 torch.mm rate; (b) quality after --minutes of training each (evaluation not counted), --samples per sampler.

Needs diffusers: pip install -r benchmarks/requirements-diffusers.txt (keep the installed torch).
RESULTS.md gives the command of its tables (about 25 minutes on the 2-core CPU). Smoke test (a few minutes):
    python benchmarks/vs_diffusers.py --minutes 0.02 --samples 4 --throughput-seconds 1 --base-channels 8 \\
        --channel-mults 1,2 --batch-size 8 --threads 1 --out /tmp/bench_smoke/vs_diffusers
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

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch
import torch.nn.functional as F
from torch import nn

import diffusion_utils as du

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
except ImportError:  # main() says how to install it
    diffusers = None

OUR_UNET = du.UNet  # Setup.same_network_trainer stands SameNetwork in for du.UNet while a Trainer is built
ROWS = ("ours", "diffusers-defaults", "diffusers-best", "diffusers-same-network", "diffusers-same-recipe")
OURS_SAMPLERS = [("ddpm", du.DEFAULT_STEPS), ("ddim", 50)]  # du.sample, for ours and diffusers-same-network
DDIM_STEPS = 50  # DDIMScheduler, for the other diffusers rows
# (a)'s timed steps, name -> (label, network): the shared step on each network, then each row's whole training step
STEPS = {
    "ours": ("ours (du.UNet), shared step", "ours"),
    "diffusers": ("diffusers UNet2DModel 64x64, shared step", "diffusers"),
    "same-network": ("diffusers-same-network, shared step", "same-network"),
    "trainer": ("ours, whole du.Trainer.train_step", "ours"),
    "same-network-trainer": ("diffusers-same-network, whole du.Trainer.train_step", "same-network"),
    "same-recipe": ("diffusers-same-recipe, whole diffusers step", "same-network"),
}
WHOLE_STEPS = ("trainer", "same-network-trainer", "same-recipe")
THROUGHPUT_COLUMNS = bc.columns(
    "name|network / step; parameters||,; gflops_per_image|GFLOP / training image|.3f; layout",
    "images_per_s|images/s|.1f; ours_speedup|ours / this (same kind of step, layout)|.2f",
    "achieved_gflops|achieved GFLOP/s|.1f; share_of_mm|share of fp32 mm|%",
)
QUALITY_COLUMNS = bc.columns(
    "run; steps_trained|steps; images_seen; loss|loss (last 50)|.4f; implementation|sampler code; sampler",
    "steps|sampling steps; valid||%; mid_gray|mid-gray|%; circle_share||.2f; size_w1|size W1|.2f",
    "position_w1|position W1|.2f",
)


class DiffusersNet(nn.Module):
    """A full-resolution (64x64) UNet2DModel with attention, called like du.UNet: net(x, t) -> tensor."""

    def __init__(self, channels: tuple[int, ...], layers: int) -> None:
        super().__init__()
        self.unet = UNet2DModel(
            sample_size=du.IMAGE_SIZE,
            in_channels=1,
            out_channels=1,
            block_out_channels=channels,
            layers_per_block=layers,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            norm_num_groups=math.gcd(32, *channels),  # GroupNorm's group count must divide every width
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def match_diffusers_config(target: int) -> tuple[tuple[int, ...], int, int]:
    """(block_out_channels, layers_per_block, parameters) of a grid entry close to target: the fewest levels among
    those within 5 %, then the closest count; if none is that close, simply the closest."""
    candidates = []
    for width, mults, layers in itertools.product(
        (8, 16, 24, 32, 48, 64, 96, 128),
        ((1, 1, 2), (1, 2, 2), (1, 2, 4), (1, 1, 2, 2), (1, 2, 2, 2), (1, 2, 2, 4)),
        (1, 2),
    ):
        channels = tuple(width * m for m in mults)
        with torch.device("meta"):
            count = du.count_parameters(DiffusersNet(channels, layers))
        candidates.append((abs(math.log(count / target)), len(channels), channels, layers, count))
    close = [c for c in candidates if c[0] <= math.log(1.05)]
    best = min(close, key=lambda c: (c[1], c[0])) if close else min(candidates)
    return best[2], best[3], best[4]


class SameNetwork(nn.Module):
    """diffusers-same-network: PixelUnshuffle -> UNet2DModel shaped like our U-Net -> PixelShuffle, called like
    du.UNet; `config` is the du.ModelConfig it stands in for (du.sample reads the prediction type there)."""

    def __init__(self, config: du.ModelConfig) -> None:
        super().__init__()
        self.config = config
        factor = config.pixel_unshuffle
        widths = tuple(config.base_channels * m for m in config.channel_mults)
        with torch.device("meta"):  # du.UNet fixes the bottleneck's head count: read it there
            heads = OUR_UNET(dataclasses.replace(config, bottleneck_attention=True)).mid_attention.heads
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
            attention_head_dim=widths[-1] // heads,
            norm_num_groups=math.gcd(8, *widths),  # ours: GroupNorm(gcd(8, c), c); diffusers takes one count
            dropout=config.dropout,
            time_embedding_type="positional",
            flip_sin_to_cos=True,  # [cos, sin], as du.sinusoidal_embedding
            freq_shift=0,  # frequencies 10000^(-k / half), as ours
            time_embedding_dim=config.base_channels * 4,  # Linear(base, 4 base) -> SiLU -> Linear, as du.UNet.time_mlp
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.unet(self.unshuffle(x), t).sample)


class HarnessStep:
    """du.diffusion_loss (eps target, plain MSE) + backward + grad clip + AdamW: the same for any net."""

    def __init__(self, net: nn.Module, device: torch.device, precision: str, channels_last: bool, seed: int) -> None:
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device).train().to(memory_format=self.layout)
        self.device, self.precision = device, precision
        self.schedule = du.NoiseSchedule.create("linear")
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=du.fused_adamw(device))
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.generator = torch.Generator(device).manual_seed(seed)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
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


@dataclasses.dataclass
class DiffusersRecipe:
    """The defaults are diffusers' example (train_unconditional.py) where it has one."""

    name: str
    beta_schedule: str
    prediction_type: str
    lr: float
    warmup_steps: int
    lr_schedule: str  # a diffusers.optimization.get_scheduler name
    ema_decay: float | None
    adam_betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    same_network: bool = False  # SameNetwork instead of the 64x64 UNet2DModel
    ours_ema_warmup: bool = False  # EMAModel's decay warm-up (1 + k) / (10 + k) and fused update, as du.EMA
    min_snr_gamma: float | None = None  # None: plain MSE; else du's min-SNR weight from compute_snr
    min_snr_form: str = "cap"  # as du.TrainConfig.min_snr_form
    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"  # the sampling schedulers' grid; "linspace" is ours
    channels_last: bool = False
    ddpm_steps: int | None = None  # also sample with DDPMScheduler at this many steps


class DiffusersRun:
    """Train a diffusers network with diffusers' parts (as their example does), then sample it with their schedulers.
    The network is called like du.UNet (DiffusersNet or SameNetwork): net(x, t) -> tensor."""

    def __init__(self, recipe: DiffusersRecipe, make_net: Callable, setup: Setup, estimated_steps: int) -> None:
        self.recipe, self.device, self.precision = recipe, setup.device, setup.precision
        self.batch_size, self.seed = setup.train.batch_size, setup.args.seed
        torch.manual_seed(self.seed)
        layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
        self.layout, self.net = layout, make_net().to(self.device).train().to(memory_format=layout)
        names = ("num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing")
        # clip_sample: x0_hat clipped to [-1, 1] when sampling (the default; ours too)
        self.scheduler = DDPMScheduler(clip_sample=True, **{name: getattr(recipe, name) for name in names})
        adam = {"lr": recipe.lr, "betas": recipe.adam_betas, "weight_decay": recipe.weight_decay}
        self.optimizer = torch.optim.AdamW(self.net.parameters(), **adam)
        warmup, total = recipe.warmup_steps, max(estimated_steps, recipe.warmup_steps + 1)
        self.lr_scheduler = get_scheduler(
            recipe.lr_schedule, self.optimizer, num_warmup_steps=warmup, num_training_steps=total
        )
        self.ema = None
        if recipe.ema_decay:  # diffusers' example warm-up, or (ours_ema_warmup) EMAModel's default, as du.EMA
            warmup = {} if recipe.ours_ema_warmup else {"use_ema_warmup": True, "inv_gamma": 1.0, "power": 3 / 4}
            self.ema = EMAModel(self.net.parameters(), decay=recipe.ema_decay, foreach=recipe.ours_ema_warmup, **warmup)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.step, self.images_seen, self.losses = 0, 0, []

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """du's min-SNR weight written with compute_snr: lam = SNR (epsilon) or SNR + 1 (v_prediction) is the x_0
        weight plain MSE on that target gives; "cap": min(lam, gamma) / lam; "paper": min(SNR, gamma) / lam."""
        snr = compute_snr(self.scheduler, t)
        lam = snr + 1 if self.recipe.prediction_type == "v_prediction" else snr
        capped = (lam if self.recipe.min_snr_form == "cap" else snr).clamp(max=self.recipe.min_snr_gamma)
        return capped / lam

    def train_step(self, batch: tuple[torch.Tensor, du.Condition | None]) -> torch.Tensor:
        """One optimiser step on an (images, condition) batch; the condition is not used. Returns the loss tensor."""
        x0 = batch[0].to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(x0),), generator=self.generator, device=self.device)
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

    def train(self, minutes: float, progress: bool = False) -> None:
        """Train for `minutes` of wall-clock time (called like du.Trainer.train; no progress bar)."""
        deadline = time.monotonic() + minutes * 60
        batches, losses = du.training_batches(self.batch_size, self.seed, self.step), []
        while time.monotonic() < deadline:
            losses.append(self.train_step(next(batches)))
            if len(losses) % 10 == 0:  # a short queue, so that the deadline holds on a GPU
                bc.synchronize(self.device)
        self.losses += torch.stack(losses).float().cpu().tolist() if losses else []
        bc.synchronize(self.device)

    @torch.no_grad()
    def sample(self, n: int, sampler: str, steps: int, batch_size: int = 256) -> torch.Tensor:
        """n images with DDIMScheduler (eta 0) or DDPMScheduler built from the training config, from the EMA
        weights copied into a twin network."""
        net = self.net.eval() if self.ema is None else copy.deepcopy(self.net).eval()
        if self.ema is not None:
            self.ema.copy_to(net.parameters())
        scheduler = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        images = torch.empty(n, 1, du.IMAGE_SIZE, du.IMAGE_SIZE)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            generator = torch.Generator(self.device).manual_seed(bc.SAMPLE_SEED * 1_000_003 + start)
            x = torch.randn((stop - start, 1, du.IMAGE_SIZE, du.IMAGE_SIZE), generator=generator, device=self.device)
            for t in scheduler.timesteps:
                with du.autocast_for(self.device, self.precision):
                    output = net(x, t).float()
                extra = {"eta": 0.0} if sampler == "ddim" else {}
                x = scheduler.step(output, t, x, generator=generator, **extra).prev_sample
            images[start:stop] = x.clamp(-1, 1).cpu()
        return images


def diffusers_recipes(s: Setup) -> dict[str, DiffusersRecipe]:
    """diffusers' example recipe, its "best" variant, and diffusers' own parts set to our recipe's values."""
    model, train = s.same_config, s.train
    shared = ("lr", "warmup_steps", "ema_decay", "weight_decay", "grad_clip", "min_snr_gamma", "min_snr_form")
    same = DiffusersRecipe(
        "diffusers-same-recipe",
        beta_schedule={"cosine": "squaredcos_cap_v2", "linear": "linear"}[model.schedule],
        prediction_type={"v": "v_prediction", "eps": "epsilon"}[model.prediction],
        lr_schedule="cosine" if train.lr_schedule == "cosine" else "constant_with_warmup",
        adam_betas=(0.9, 0.999),  # torch's AdamW defaults, which du.Trainer keeps
        same_network=True,
        ours_ema_warmup=True,
        num_train_timesteps=model.num_timesteps,
        timestep_spacing="linspace",  # linspace(0, T - 1, steps) rounded: du's "time" spacing
        channels_last=train.channels_last,
        ddpm_steps=du.DEFAULT_STEPS,
        **{key: getattr(train, key) for key in shared},
    )
    best = ("diffusers-best", "squaredcos_cap_v2", "v_prediction", 1e-3, 200, "constant_with_warmup", 0.999)
    recipes = [DiffusersRecipe("diffusers-defaults", "linear", "epsilon", 1e-4, 500, "cosine", None)]
    return {recipe.name: recipe for recipe in [*recipes, DiffusersRecipe(*best), same]}


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
        return DiffusersNet(self.channels, self.layers)

    def same_network(self, config: du.ModelConfig | None = None) -> SameNetwork:
        return SameNetwork(config or self.same_config)

    def same_network_trainer(self) -> du.Trainer:
        """Our whole training step around SameNetwork: it stands in for du.UNet while the Trainer is built, so its
        weights are drawn under the Trainer's seed and everything else is what ours gets."""
        with unittest.mock.patch.object(du, "UNet", self.same_network):
            return du.Trainer(self.same_config, self.train, device=self.device)

    def diffusers_run(self, recipe: DiffusersRecipe, estimated_steps: int) -> DiffusersRun:
        return DiffusersRun(recipe, self.same_network if recipe.same_network else self.their_net, self, estimated_steps)


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/vs_diffusers")
    parser.add_argument("--minutes", type=float, default=10.0, help="(b) training minutes per row (default 10)")
    parser.add_argument("--samples", type=int, default=256, help="(b) images drawn per evaluation (default 256)")
    parser.add_argument("--throughput-seconds", type=float, default=30.0, help="(a) seconds per step (default 30)")
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def start(args) -> Setup:
    """Our recipe for the device, the diffusers networks (sized like ours, shaped like ours) and the batches."""
    device = bc.setup(args)
    model, train = bc.apply_overrides(*du.default_configs(device, "diffusion"), args)
    ours = du.count_parameters(du.UNet(model))
    channels, layers, theirs = match_diffusers_config(ours)
    same_config = dataclasses.replace(model, conditional=False)  # UNet2DModel has no place for a request
    with torch.device("meta"):
        same = du.count_parameters(SameNetwork(same_config))
    batches = list(itertools.islice(du.training_batches(train.batch_size, args.seed), 4))
    params = {"ours": ours, "diffusers": theirs, "same-network": same}
    precision = du.choose_precision(device)
    return Setup(args, device, precision, model, train, same_config, channels, layers, params, batches)


def throughput_steps(s: Setup) -> dict[str, Callable]:
    """ "name|layout" -> step: the shared step for each network in each layout, then each row's whole step."""
    networks = {"ours": lambda: du.UNet(s.model), "diffusers": s.their_net, "same-network": s.same_network}
    steps: dict[str, Callable] = {}
    for channels_last in (False, True):
        for name, make in networks.items():
            torch.manual_seed(s.args.seed)
            tag = "channels_last" if channels_last else "contiguous"
            steps[f"{name}|{tag}"] = HarnessStep(make(), s.device, s.precision, channels_last, s.args.seed)
    trainer, same_trainer = du.Trainer(s.model, s.train, device=s.device), s.same_network_trainer()
    steps[f"trainer|{s.layout}"] = lambda batch: bc.train_step(trainer, batch)
    steps[f"same-network-trainer|{s.layout}"] = lambda batch: bc.train_step(same_trainer, batch)
    steps[f"same-recipe|{s.layout}"] = s.diffusers_run(diffusers_recipes(s)["diffusers-same-recipe"], 1000).train_step
    return steps


def training_throughput(s: Setup) -> tuple[list[dict], dict[str, float], float]:
    """(a) The rows (images/s, FLOPs, the achieved share of a torch.mm rate), {"name|layout": images/s} and the
    torch.mm rate."""
    steps = throughput_steps(s)
    print(f"(a) timing {len(steps)} training steps x {s.args.throughput_seconds:g} s ...", flush=True)
    measured = bc.measure_throughput(steps, s.batches, s.device, s.args.throughput_seconds)
    rates = {key: row["images_per_s"] for key, row in measured.items()}
    flops, x0 = {}, s.batches[0][0][:4]
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
        row = {"key": key, "name": label, "layout": layout, "parameters": s.params[network]}
        row |= {"gflops_per_image": flops[network] / 1e9, "images_per_s": rate, "ours_speedup": reference / rate}
        rows.append(row | {"achieved_gflops": achieved / 1e9, "share_of_mm": achieved / mm})
    return rows, rates, mm


def quality_at_equal_time(s: Setup, rates: dict[str, float]) -> list[dict]:
    """(b) Each row trains for --minutes, then draws --samples images per sampler, scored by du.evaluate_samples.
    The diffusers cosine lr schedules need a step count: estimated from (a)'s images/s."""
    args, rows, recipes = s.args, [], diffusers_recipes(s)
    for name in ROWS:
        print(f"(b) training {name} for {args.minutes:g} min ...", flush=True)
        if name in ("ours", "diffusers-same-network"):
            trained = du.Trainer(s.model, s.train, device=s.device) if name == "ours" else s.same_network_trainer()
        else:
            recipe = recipes[name]
            key = f"same-recipe|{s.layout}" if recipe.same_network else "diffusers|contiguous"
            estimated = round(rates.get(key, 100.0) * args.minutes * 60 / s.train.batch_size)
            trained = s.diffusers_run(recipe, max(1, estimated))
        trained.train(minutes=args.minutes, progress=False)
        run = {"run": name, "steps_trained": trained.step, "images_seen": trained.images_seen}
        run["loss"] = bc.mean_tail(trained.losses)
        if isinstance(trained, du.Trainer):
            for sampler, steps in OURS_SAMPLERS:
                model, schedule = trained.sampling_model, trained.schedule
                metrics, images = bc.sample_and_evaluate(model, schedule, args.samples, sampler, steps, s.device)
                add_row(s, rows, {**run, "implementation": "du.sample", **metrics}, images)
            continue
        for sampler, steps in ([("ddpm", recipe.ddpm_steps)] if recipe.ddpm_steps else []) + [("ddim", DDIM_STEPS)]:
            images, seconds = bc.timed(lambda r=trained, k=sampler, n=steps: r.sample(args.samples, k, n), s.device)
            code = f"diffusers {'DDIMScheduler' if sampler == 'ddim' else 'DDPMScheduler'}"
            metrics = {"sampler": sampler, "steps": steps, "sample_seconds": seconds, **du.evaluate_samples(images)}
            add_row(s, rows, {**run, "implementation": code, **metrics}, images)
    return rows


def add_row(s: Setup, rows: list[dict], row: dict, images: torch.Tensor) -> None:
    """Add the row, print it and save its sample grid."""
    rows.append(row)
    print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)
    title = f"{row['run']}, {row['sampler']} {row['steps']}: valid {100 * row['valid']:.0f}%"
    path = s.args.out / f"samples_{row['run']}_{row['sampler']}{row['steps']}.png"
    du.save_figure(du.plot_grid(images[:32], title=title), path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if diffusers is None:
        print("vs_diffusers.py needs diffusers: pip install -r benchmarks/requirements-diffusers.txt", file=sys.stderr)
        return 2
    diffusers.utils.logging.set_verbosity_error()
    args.out = bc.prepare_out(args.out)
    s = start(args)
    env = bc.environment(s.device, __file__) | {"diffusers": diffusers.__version__}
    print(bc.environment_line(env), flush=True)
    throughput, rates, mm = training_throughput(s)
    print(bc.markdown_table(throughput, THROUGHPUT_COLUMNS), flush=True)
    quality = quality_at_equal_time(s, rates)
    sections = [
        f"ours: {du.describe_model(du.UNet(s.model))}; diffusers 64x64: block_out_channels={s.channels}, "
        f"layers_per_block={s.layers}; batch {s.train.batch_size}, {s.precision}",
        f"## (a) Training throughput (fp32 torch.mm: {mm / 1e9:.0f} GFLOP/s)\n\n"
        + bc.markdown_table(throughput, THROUGHPUT_COLUMNS),
        f"## (b) Quality after {args.minutes:g} min of training each\n\n" + bc.markdown_table(quality, QUALITY_COLUMNS),
    ]
    payload = {"ours": {"model": s.model, "train": s.train}, "parameters": s.params, "throughput": throughput}
    payload |= {"mm_fp32_gflops": mm / 1e9, "quality": quality}
    bc.write_report(args.out, "vs_diffusers", f"Ours vs diffusers {diffusers.__version__}", env, sections, **payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
