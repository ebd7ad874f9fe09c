"""Side by side with Hugging Face diffusers: speed, quality at equal wall-clock time, efficiency.

Same data (du.training_batches, same seed), same device, same batch size (our default for the
device unless --batch-size), same mixed precision (du.choose_precision) for every run.

(a) Training throughput, images/s: our default U-Net vs a diffusers UNet2DModel of comparable
    parameter count (chosen automatically within ~15%, or --diffusers-channels/--diffusers-layers;
    in/out channels 1, sample_size 64, plain Down/UpBlock2D, the default attention in the mid
    block). Both run the SAME step (du.diffusion_loss with eps target, backward, grad clip,
    AdamW), in contiguous and channels_last layouts, timed in alternating rounds in one process;
    our full du.Trainer.train_step (min-SNR, EMA) is measured too.
(b) Quality after --minutes of training each (evaluation not counted):
      ours               du.default_configs(device) via du.Trainer, sampled with --ours-samplers
      diffusers-defaults as diffusers' examples/unconditional_image_generation/train_unconditional.py
                         by default: DDPMScheduler(1000, "linear", "epsilon"), AdamW lr 1e-4,
                         betas (0.95, 0.999), weight decay 1e-6, eps 1e-8, cosine lr schedule
                         with 500 warm-up steps (its length estimated from the measured
                         throughput, since the budget is wall-clock), grad clip 1.0, no EMA
                         (the script's --use_ema is off by default; --defaults-ema turns it on)
      diffusers-best     DDPMScheduler("squaredcos_cap_v2", "v_prediction"), target
                         scheduler.get_velocity, EMA via diffusers.training_utils.EMAModel
                         (decay 0.999 with warm-up), lr 1e-3 with 200 warm-up steps then constant
                         (our recipe's lr), the same AdamW betas/weight decay as the example
    Each draws --samples images, scored by du.evaluate_samples: ours with du.sample, theirs with
    DDIMScheduler.from_config(...) at 50 steps (and DDPMScheduler with --diffusers-ddpm-steps).
(c) Sampling time for --samples images at 50 DDIM steps: our du.sample vs their DDIMScheduler
    loop, with validity (from the models of (b); untrained models when (b) is not run).
(d) Hardware efficiency: FLOPs per training image (forward + backward, FlopCounterMode) x
    images/s from (a), as a share of a measured square torch.mm rate (fp32, and the training
    precision when that differs) on the same device in the same run.

Needs diffusers: pip install -r benchmarks/requirements-diffusers.txt (torch already installed).

Example (the lead's run on the 2-core CPU; about 40 min: 3 x 10 min training + sampling):
    python benchmarks/vs_diffusers.py --minutes 10
Smoke test (about a minute):
    python benchmarks/vs_diffusers.py --minutes 0.05 --samples 8 --throughput-seconds 2 --ours-samplers ddim:5 \\
        --ddim-steps 5 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import sys
import time
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
    from diffusers.training_utils import EMAModel
except ImportError:  # the script says how to install it
    diffusers = None


# ------------------------------------------------------------------------------------------
# The diffusers network, sized like ours
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


# ------------------------------------------------------------------------------------------
# (a) Throughput: one identical training step for both networks
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


class DiffusersRun:
    """Train a UNet2DModel as the diffusers example does, then sample it with their schedulers."""

    def __init__(
        self,
        recipe: DiffusersRecipe,
        channels: tuple[int, ...],
        layers: int,
        attention: bool,
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
        self.unet = diffusers_unet(channels, layers, attention).to(device).train()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule=recipe.beta_schedule, prediction_type=recipe.prediction_type
        )
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
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
        self.ema = (
            EMAModel(self.unet.parameters(), decay=recipe.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
            if recipe.ema_decay
            else None
        )
        self.generator = torch.Generator(device).manual_seed(seed)
        self.step, self.images_seen, self.losses = 0, 0, []

    def train(self, minutes: float) -> None:
        deadline = time.monotonic() + minutes * 60
        batches = du.training_batches(self.batch_size, self.seed, self.step)
        pending = []
        while time.monotonic() < deadline:
            x0 = next(batches)[0].to(self.device, non_blocking=True)
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
            t = torch.randint(
                0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator, device=self.device
            )
            noisy = self.scheduler.add_noise(x0, noise, t)
            with du.autocast_for(self.device, self.precision):
                output = self.unet(noisy, t).sample
            target = noise if self.recipe.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
            loss = F.mse_loss(output.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.recipe.grad_clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.unet.parameters())
            self.optimizer.zero_grad(set_to_none=True)
            pending.append(loss.detach())
            self.step += 1
            self.images_seen += len(x0)
            if len(pending) >= 10:
                self.losses += torch.stack(pending).float().cpu().tolist()
                pending = []
        if pending:
            self.losses += torch.stack(pending).float().cpu().tolist()
        bc.synchronize(self.device)

    def sampling_unet(self) -> nn.Module:
        """The EMA weights copied into a twin network (the training weights stay as they are)."""
        if self.ema is None:
            return self.unet.eval()
        twin = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(twin.parameters())
        return twin

    @torch.no_grad()
    def sample(self, n: int, sampler: str, steps: int, seed: int = 1234, batch_size: int = 256) -> torch.Tensor:
        """n images with DDIMScheduler (eta 0) or DDPMScheduler built from the training config."""
        unet = self.sampling_unet()
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
                    output = unet(x, t).sample.float()
                extra = {"eta": 0.0} if sampler == "ddim" else {}
                x = scheduler.step(output, t, x, generator=generator, **extra).prev_sample
            images[start:stop] = x.clamp(-1, 1).cpu()
        return images


# ------------------------------------------------------------------------------------------
# Reporting columns
# ------------------------------------------------------------------------------------------

THROUGHPUT_COLUMNS = [
    ("name", "network / step", ""),
    ("parameters", "parameters", ","),
    ("layout", "layout", ""),
    ("images_per_s", "images/s", ".1f"),
    ("vs_diffusers", "vs diffusers (same layout)", ".2f"),
]
QUALITY_COLUMNS = [
    ("run", "run", ""),
    ("steps_trained", "steps", ""),
    ("images_seen", "images seen", ""),
    ("loss", "loss (last 50)", ".4f"),
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
    ("name", "network", ""),
    ("parameters", "parameters", ","),
    ("gflops_per_image", "GFLOP / training image", ".3f"),
    ("images_per_s", "images/s (a)", ".1f"),
    ("achieved_gflops", "achieved GFLOP/s", ".1f"),
    ("share_fp32", "share of fp32 mm", "%"),
    ("share_train_precision", "share of mm in training precision", "%"),
]
STEP_LABELS = {
    "ours": "ours (du.UNet), shared step",
    "diffusers": "diffusers UNet2DModel, shared step",
    "trainer": "ours, full du.Trainer.train_step",
}


# ------------------------------------------------------------------------------------------
# Phases, in the order main() runs them
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Comparison:
    """What every phase shares: the settings, both networks' shapes, the batches, the payload and the report."""

    args: argparse.Namespace
    device: torch.device
    out: Path
    env: dict
    precision: str
    ours_model_config: du.ModelConfig
    ours_train_config: du.TrainConfig
    ours_params: int
    channels: tuple[int, ...]  # the diffusers UNet2DModel's block_out_channels
    layers: int
    attention: bool
    their_params: int
    batches: list
    payload: dict = dataclasses.field(default_factory=dict)
    sections: list[str] = dataclasses.field(default_factory=list)
    throughput: dict[str, dict] = dataclasses.field(default_factory=dict)
    harness: dict[str, HarnessStep] = dataclasses.field(default_factory=dict)
    runs: dict[str, dict] = dataclasses.field(default_factory=dict)  # (b)'s trained runs, for (c)

    @property
    def batch_size(self) -> int:
        return self.ours_train_config.batch_size

    def their_net(self) -> nn.Module:
        return diffusers_unet(self.channels, self.layers, self.attention)

    def diffusers_run(self, recipe: DiffusersRecipe, estimated_steps: int) -> DiffusersRun:
        return DiffusersRun(
            recipe,
            self.channels,
            self.layers,
            self.attention,
            self.device,
            self.precision,
            self.batch_size,
            self.args.seed,
            estimated_steps,
        )

    def add_section(self, text: str, blank_before: bool = False) -> None:
        self.sections.append(text)
        print(("\n" if blank_before else "") + text + "\n", flush=True)

    def save(self) -> None:
        bc.save_json(self.out / "vs_diffusers.json", self.payload)
        bc.save_text(self.out / "vs_diffusers.md", "\n\n".join(self.sections))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, "runs/benchmarks/vs_diffusers")
    add = parser.add_argument
    add("--parts", default="a,b,c,d", help="which parts to run (default a,b,c,d)")
    add("--minutes", type=float, default=10.0, help="(b) training budget per run in minutes (default 10)")
    add("--samples", type=int, default=256, help="(b, c) images drawn per evaluation (default 256)")
    add(
        "--ours-samplers",
        type=bc.parse_samplers,
        default=bc.parse_samplers("ddpm:100,ddim:50"),
        help="(b) our sampler:steps list (default ddpm:100,ddim:50)",
    )
    add("--ddim-steps", type=int, default=50, help="(b, c) DDIM steps for both libraries (default 50)")
    add(
        "--diffusers-ddpm-steps",
        type=int,
        default=0,
        help="(b) also sample diffusers runs with DDPMScheduler at this many steps (0: skip; 1000 is the example's)",
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
        help="(d) images in the FLOP-counted step (FLOPs scale linearly; default 4)",
    )
    add(
        "--diffusers-channels",
        type=bc.parse_ints,
        help="UNet2DModel block_out_channels, e.g. 32,32,64 (default: matched to our parameter count)",
    )
    add(
        "--diffusers-layers",
        type=int,
        default=None,
        help="UNet2DModel layers_per_block (with --diffusers-channels; default 1)",
    )
    add(
        "--no-diffusers-attention",
        action="store_true",
        help="drop the mid-block attention that UNet2DModel has by default",
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
    """Our recipe for the device, a diffusers UNet2DModel of about its size, the shared batches and the header."""
    device = bc.setup(args)
    env = bc.environment(device)
    env["diffusers"] = diffusers.__version__
    ours_model_config, ours_train_config = bc.apply_overrides(*du.default_configs(device), args)
    ours_params = du.count_parameters(du.UNet(ours_model_config))
    attention = not args.no_diffusers_attention
    if args.diffusers_channels:
        channels, layers = tuple(args.diffusers_channels), args.diffusers_layers or 1
        with torch.device("meta"):
            their_params = du.count_parameters(diffusers_unet(channels, layers, attention))
    else:
        channels, layers, their_params = match_diffusers_config(ours_params, attention)
    batch_size = ours_train_config.batch_size
    comparison = Comparison(
        args=args,
        device=device,
        out=bc.prepare_out(args.out),
        env=env,
        precision=du.choose_precision(device),
        ours_model_config=ours_model_config,
        ours_train_config=ours_train_config,
        ours_params=ours_params,
        channels=channels,
        layers=layers,
        attention=attention,
        their_params=their_params,
        batches=list(itertools.islice(du.training_batches(batch_size, args.seed), 4)),
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
        "batch_size": batch_size,
        "precision": comparison.precision,
    }
    comparison.sections = [f"# Ours vs diffusers {diffusers.__version__}", bc.environment_line(env)]
    return comparison


def print_header(c: Comparison) -> None:
    print(f"# Ours vs diffusers {diffusers.__version__}\n{bc.environment_line(c.env)}", flush=True)
    ratio = c.their_params / c.ours_params
    if not 0.85 <= ratio <= 1.15:
        print(f"warning: the diffusers network has {ratio:.2f}x our parameters (outside 0.85-1.15)", flush=True)
    theirs = (
        f"diffusers UNet2DModel: block_out_channels={c.channels}, layers_per_block={c.layers}, "
        f"mid-block attention {c.attention}, {c.their_params:,} parameters ({ratio:.2f}x ours)"
    )
    setting = f"batch {c.batch_size}, precision {c.precision}"
    print(f"ours: {du.describe_model(du.UNet(c.ours_model_config))}\n{theirs}; {setting}\n", flush=True)


def build_throughput_steps(c: Comparison) -> dict[str, Callable]:
    """The shared step for both networks in each layout, and our full Trainer.train_step."""
    torch.manual_seed(c.args.seed)
    ours_net = du.UNet(c.ours_model_config)
    torch.manual_seed(c.args.seed)
    their_net = DiffusersNet(c.their_net())
    channels_last = c.ours_train_config.channels_last
    if c.device.type == "cpu":
        layouts = [False, True]
    else:
        layouts = [False, channels_last] if channels_last else [False]
    steps: dict[str, Callable] = {}
    for layout in dict.fromkeys(layouts):
        tag = "channels_last" if layout else "contiguous"
        steps[f"ours|{tag}"] = HarnessStep(copy.deepcopy(ours_net), c.device, c.precision, layout, c.args.seed)
        steps[f"diffusers|{tag}"] = HarnessStep(copy.deepcopy(their_net), c.device, c.precision, layout, c.args.seed)
    trainer = du.Trainer(c.ours_model_config, c.ours_train_config, device=c.device)
    steps["trainer|" + ("channels_last" if channels_last else "contiguous")] = lambda batch: trainer.train_step(*batch)
    return steps


def training_throughput(c: Comparison) -> None:
    """(a) images/s of the same step for both networks, timed in alternating rounds (also what (d) needs)."""
    parts, args = c.args.part_set, c.args
    seconds = args.throughput_seconds if "a" in parts else max(3.0, args.throughput_seconds / 3)
    steps = build_throughput_steps(c)
    c.harness = {k: v for k, v in steps.items() if isinstance(v, HarnessStep)}
    print(f"(a) timing training steps: {len(steps)} configurations x {seconds:.0f} s ...", flush=True)
    c.throughput = bc.measure_throughput(steps, c.batches, c.device, seconds)
    rows = [throughput_row(c, key, result) for key, result in c.throughput.items()]
    c.payload["throughput"] = rows
    best_ours = max(r["images_per_s"] for r in rows if r["key"].startswith("ours|"))
    best_theirs = max(r["images_per_s"] for r in rows if r["key"].startswith("diffusers|"))
    c.payload["throughput_ratio_best_layouts"] = best_ours / best_theirs
    table = bc.markdown_table(rows, THROUGHPUT_COLUMNS)
    c.add_section(
        f"## (a) Training throughput (batch {c.batch_size}, {c.precision})\n\n{table}\n\n"
        f"ours / diffusers, each in its faster layout: **{best_ours / best_theirs:.2f}x**"
    )
    c.save()


def throughput_row(c: Comparison, key: str, result: dict) -> dict:
    name, layout = key.split("|")
    parameters = c.their_params if name == "diffusers" else c.ours_params
    row = {"key": key, "name": STEP_LABELS[name], "layout": layout, "parameters": parameters, **result}
    other = c.throughput.get(f"diffusers|{layout}")
    row["vs_diffusers"] = result["images_per_s"] / other["images_per_s"] if other else math.nan
    return row


def quality_at_equal_time(c: Comparison) -> None:
    """(b) Each run trains for --minutes, then draws --samples images scored by du.evaluate_samples."""
    print(f"(b) training each run for {c.args.minutes} min ...", flush=True)
    quality_rows: list[dict] = []
    train_ours(c, quality_rows)
    estimated_steps = estimate_diffusers_steps(c)
    recipes = diffusers_recipes(c.args)
    c.payload["diffusers_recipes"] = recipes
    c.payload["estimated_diffusers_steps"] = estimated_steps
    for recipe in recipes:
        train_diffusers(c, recipe, estimated_steps, quality_rows)
        c.payload["quality"] = quality_rows
        c.save()
    table = bc.markdown_table(quality_rows, QUALITY_COLUMNS)
    heading = f"## (b) Quality after {c.args.minutes} min of training each (batch {c.batch_size}, {c.precision})"
    c.add_section(f"{heading}\n\n{table}", blank_before=True)
    c.payload["quality"] = quality_rows
    c.save()


def train_ours(c: Comparison, quality_rows: list[dict]) -> None:
    """Our recipe via du.Trainer, sampled (unconditionally) with each of --ours-samplers and DDIM --ddim-steps."""
    args = c.args
    trainer = du.Trainer(c.ours_model_config, c.ours_train_config, device=c.device)
    _, train_seconds = bc.timed(lambda: trainer.train(minutes=args.minutes, progress=False), c.device)
    c.runs["ours"] = {"trainer": trainer}
    for sampler, steps_count in dict.fromkeys(args.ours_samplers + [("ddim", args.ddim_steps)]):
        metrics, images = bc.sample_and_evaluate(
            trainer.sampling_model, trainer.schedule, args.samples, sampler, steps_count, c.device, batch_size=256
        )
        row = {
            "run": "ours",
            "steps_trained": trainer.step,
            "images_seen": trainer.images_seen,
            "train_seconds": train_seconds,
            "loss": bc.mean_tail(trainer.losses),
            "implementation": "du.sample",
            **metrics,
        }
        quality_rows.append(row)
        if sampler == "ddim" and steps_count == args.ddim_steps:
            c.runs["ours"]["ddim_row"] = row
        title = f"ours, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"
        bc.save_figure(du.plot_grid(images[:32], title=title), c.out / f"samples_ours_{sampler}{steps_count}.png")
        print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)


def estimate_diffusers_steps(c: Comparison) -> int:
    """How many steps diffusers' runs will take in --minutes (their cosine lr schedule needs its length)."""
    their_rate = c.throughput.get("diffusers|contiguous", {}).get("images_per_s")
    if their_rate is None:
        probe_step = HarnessStep(DiffusersNet(c.their_net()), c.device, c.precision, False, c.args.seed)
        probe = bc.measure_throughput({"d": probe_step}, c.batches, c.device, 5.0, rounds=1)
        their_rate = probe["d"]["images_per_s"]
    return max(1, round(their_rate * c.args.minutes * 60 / c.batch_size))


def diffusers_recipes(args: argparse.Namespace) -> list[DiffusersRecipe]:
    defaults_ema = 0.9999 if args.defaults_ema else None
    return [
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
    ]


def train_diffusers(c: Comparison, recipe: DiffusersRecipe, estimated_steps: int, quality_rows: list[dict]) -> None:
    """One diffusers recipe for --minutes, sampled with DDIMScheduler (and DDPMScheduler if asked)."""
    args = c.args
    run = c.diffusers_run(recipe, estimated_steps)
    _, train_seconds = bc.timed(lambda: run.train(args.minutes), c.device)
    c.runs[recipe.name] = {"run": run}
    samplers = [("ddim", args.ddim_steps)] + (
        [("ddpm", args.diffusers_ddpm_steps)] if args.diffusers_ddpm_steps else []
    )
    for sampler, steps_count in samplers:
        images, seconds = bc.timed(lambda s=sampler, k=steps_count: run.sample(args.samples, s, k), c.device)
        metrics = du.evaluate_samples(images)
        row = {
            "run": recipe.name,
            "steps_trained": run.step,
            "images_seen": run.images_seen,
            "train_seconds": train_seconds,
            "loss": bc.mean_tail(run.losses),
            "implementation": f"diffusers {'DDIMScheduler' if sampler == 'ddim' else 'DDPMScheduler'}",
            "sampler": sampler,
            "steps": steps_count,
            "sample_seconds": seconds,
            "images_per_s": args.samples / seconds,
            **metrics,
        }
        quality_rows.append(row)
        if sampler == "ddim":
            c.runs[recipe.name]["ddim_row"] = row
        title = f"{recipe.name}, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"
        path = c.out / f"samples_{recipe.name}_{sampler}{steps_count}.png"
        bc.save_figure(du.plot_grid(images[:32], title=title), path)
        print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)


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
    args = c.args
    print(f"(c) sampling untrained networks ({args.samples} images, DDIM {args.ddim_steps}) ...", flush=True)
    torch.manual_seed(args.seed)
    ours_net = du.UNet(c.ours_model_config).to(c.device)
    schedule = du.NoiseSchedule.from_config(c.ours_model_config)
    metrics, _ = bc.sample_and_evaluate(ours_net, schedule, args.samples, "ddim", args.ddim_steps, c.device)
    rows = [{"run": "ours", "implementation": "du.sample", "trained": "no", **metrics}]
    run = c.diffusers_run(DiffusersRecipe("diffusers", "linear", "epsilon", 1e-4, 0, "constant", None), 1)
    images, seconds = bc.timed(lambda: run.sample(args.samples, "ddim", args.ddim_steps), c.device)
    rows.append(
        {
            "run": "diffusers",
            "implementation": "diffusers DDIMScheduler",
            "trained": "no",
            "steps": args.ddim_steps,
            "sample_seconds": seconds,
            "images_per_s": args.samples / seconds,
            **du.evaluate_samples(images),
        }
    )
    return rows


def hardware_efficiency(c: Comparison) -> None:
    """(d) FLOPs per training image x images/s from (a), as a share of a measured torch.mm rate."""
    print("(d) counting FLOPs and timing torch.mm ...", flush=True)
    mm_fp32 = bc.matmul_flops_per_second(c.device, torch.float32)
    if c.precision == "fp32":
        mm_train = mm_fp32
    else:
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float16
        mm_train = bc.matmul_flops_per_second(c.device, dtype)
    flop_rows = [flop_row(c, name, mm_fp32, mm_train) for name in ("ours", "diffusers")]
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
        f"FLOPs = matmul/conv multiply-adds x 2 (FlopCounterMode), forward + backward\n\n{table}"
    )
    c.save()


def flop_row(c: Comparison, name: str, mm_fp32: float, mm_train: float) -> dict:
    """One network's FLOPs per training image, counted on its faster layout's shared step."""
    keys = [k for k in c.harness if k.startswith(name + "|")]
    best_key = max(keys, key=lambda k: c.throughput[k]["images_per_s"])
    step = c.harness[best_key]
    x0 = c.batches[0][0][: c.args.flop_batch]
    flops = bc.training_flops_per_image(lambda: step.loss(x0), len(x0))
    step.optimizer.zero_grad(set_to_none=True)
    rate = c.throughput[best_key]["images_per_s"]
    achieved = flops * rate
    network = "ours (du.UNet)" if name == "ours" else "diffusers UNet2DModel"
    return {
        "name": f"{network}, {best_key.split('|')[1]}",
        "parameters": c.ours_params if name == "ours" else c.their_params,
        "gflops_per_image": flops / 1e9,
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
