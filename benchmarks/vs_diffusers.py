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
        (8, 16, 24, 32, 48, 64, 96, 128), ((1, 1, 2), (1, 2, 2), (1, 2, 4), (1, 1, 2, 2), (1, 2, 2, 2), (1, 2, 2, 4)), (1, 2)
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
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=du.fused_adamw(device))  # as du.Trainer
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.generator = torch.Generator(device).manual_seed(seed)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.to(self.device, non_blocking=True)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with du.autocast_for(self.device, self.precision):
            return du.diffusion_loss(self.net, self.schedule, x0, "eps", None, self.generator)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        loss = self.loss(x0)
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
        self.recipe, self.device, self.precision, self.batch_size, self.seed = recipe, device, precision, batch_size, seed
        torch.manual_seed(seed)
        self.unet = diffusers_unet(channels, layers, attention).to(device).train()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=recipe.beta_schedule, prediction_type=recipe.prediction_type)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=recipe.lr, betas=recipe.adam_betas, weight_decay=recipe.weight_decay, eps=recipe.adam_eps)
        self.lr_scheduler = get_scheduler(
            recipe.lr_schedule, optimizer=self.optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=max(estimated_steps, recipe.warmup_steps + 1)
        )
        self.ema = EMAModel(self.unet.parameters(), decay=recipe.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4) if recipe.ema_decay else None
        self.generator = torch.Generator(device).manual_seed(seed)
        self.step, self.images_seen, self.losses = 0, 0, []

    def train(self, minutes: float) -> None:
        deadline = time.monotonic() + minutes * 60
        batches = du.training_batches(self.batch_size, self.seed, self.step)
        pending = []
        while time.monotonic() < deadline:
            x0 = next(batches).to(self.device, non_blocking=True)
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator, device=self.device)
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
# Main
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


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/vs_diffusers")
    parser.add_argument("--parts", default="a,b,c,d", help="which parts to run (default a,b,c,d)")
    parser.add_argument("--minutes", type=float, default=10.0, help="(b) training budget per run in minutes (default 10)")
    parser.add_argument("--samples", type=int, default=256, help="(b, c) images drawn per evaluation (default 256)")
    parser.add_argument(
        "--ours-samplers", type=bc.parse_samplers, default=bc.parse_samplers("ddpm:100,ddim:50"), help="(b) our sampler:steps list (default ddpm:100,ddim:50)"
    )
    parser.add_argument("--ddim-steps", type=int, default=50, help="(b, c) DDIM steps for both libraries (default 50)")
    parser.add_argument(
        "--diffusers-ddpm-steps",
        type=int,
        default=0,
        help="(b) also sample diffusers runs with DDPMScheduler at this many steps (0: skip; 1000 is the example's)",
    )
    parser.add_argument(
        "--throughput-seconds", type=float, default=30.0, help="(a) seconds of timed training per configuration, split over 3 alternating rounds (default 30)"
    )
    parser.add_argument("--flop-batch", type=int, default=4, help="(d) images in the FLOP-counted step (FLOPs scale linearly; default 4)")
    parser.add_argument(
        "--diffusers-channels", type=bc.parse_ints, help="UNet2DModel block_out_channels, e.g. 32,32,64 (default: matched to our parameter count)"
    )
    parser.add_argument("--diffusers-layers", type=int, default=None, help="UNet2DModel layers_per_block (with --diffusers-channels; default 1)")
    parser.add_argument("--no-diffusers-attention", action="store_true", help="drop the mid-block attention that UNet2DModel has by default")
    parser.add_argument("--defaults-ema", action="store_true", help="diffusers-defaults with EMA (the example's --use_ema: decay 0.9999, warm-up power 3/4)")
    parser.add_argument("--best-lr", type=float, default=1e-3, help="diffusers-best learning rate (default 1e-3, our recipe's; --lr changes ours only)")
    parser.add_argument("--best-warmup", type=int, default=200, help="diffusers-best warm-up steps (default 200)")
    parser.add_argument("--best-ema", type=float, default=0.999, help="diffusers-best EMAModel max decay (default 0.999)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    if diffusers is None:
        print("vs_diffusers.py needs diffusers: pip install -r benchmarks/requirements-diffusers.txt (keep the installed torch)", file=sys.stderr)
        return 2
    diffusers.utils.logging.set_verbosity_error()
    parts = set(args.parts.split(","))
    if not parts <= set("abcd"):
        parser.error(f"--parts takes letters from a,b,c,d; got {args.parts!r}")

    device = bc.setup(args)
    out = bc.prepare_out(args.out)
    env = bc.environment(device)
    env["diffusers"] = diffusers.__version__
    precision = du.choose_precision(device)
    ours_model_config, ours_train_config = bc.apply_overrides(*du.default_configs(device), args)
    batch_size = ours_train_config.batch_size
    ours_params = du.count_parameters(du.UNet(ours_model_config))
    attention = not args.no_diffusers_attention
    if args.diffusers_channels:
        channels, layers = tuple(args.diffusers_channels), args.diffusers_layers or 1
        with torch.device("meta"):
            their_params = du.count_parameters(diffusers_unet(channels, layers, attention))
    else:
        channels, layers, their_params = match_diffusers_config(ours_params, attention)
    print(f"# Ours vs diffusers {diffusers.__version__}\n{bc.environment_line(env)}", flush=True)
    if not 0.85 <= their_params / ours_params <= 1.15:
        print(f"warning: the diffusers network has {their_params / ours_params:.2f}x our parameters (outside 0.85-1.15)", flush=True)
    print(
        f"ours: {du.describe_model(du.UNet(ours_model_config))}\ndiffusers UNet2DModel: block_out_channels={channels}, layers_per_block={layers}, mid-block attention {attention}, {their_params:,} parameters ({their_params / ours_params:.2f}x ours); batch {batch_size}, precision {precision}\n",
        flush=True,
    )

    payload: dict = {
        "benchmark": "vs_diffusers",
        "environment": env,
        "args": vars(args),
        "ours": {"model": ours_model_config, "train": ours_train_config, "parameters": ours_params},
        "diffusers_unet": {"block_out_channels": channels, "layers_per_block": layers, "mid_attention": attention, "parameters": their_params},
        "batch_size": batch_size,
        "precision": precision,
    }
    sections: list[str] = [f"# Ours vs diffusers {diffusers.__version__}", bc.environment_line(env)]

    def save() -> None:
        bc.save_json(out / "vs_diffusers.json", payload)
        bc.save_text(out / "vs_diffusers.md", "\n\n".join(sections))

    batches = list(itertools.islice(du.training_batches(batch_size, args.seed), 4))

    def build_throughput_steps() -> dict[str, Callable]:
        torch.manual_seed(args.seed)
        ours_net = du.UNet(ours_model_config)
        torch.manual_seed(args.seed)
        their_net = DiffusersNet(diffusers_unet(channels, layers, attention))
        layouts = [False, True] if device.type == "cpu" else [False, ours_train_config.channels_last] if ours_train_config.channels_last else [False]
        steps = {}
        for channels_last in dict.fromkeys(layouts):
            tag = "channels_last" if channels_last else "contiguous"
            steps[f"ours|{tag}"] = HarnessStep(copy.deepcopy(ours_net), device, precision, channels_last, args.seed)
            steps[f"diffusers|{tag}"] = HarnessStep(copy.deepcopy(their_net), device, precision, channels_last, args.seed)
        trainer = du.Trainer(ours_model_config, ours_train_config, device=device)
        steps["trainer|" + ("channels_last" if ours_train_config.channels_last else "contiguous")] = trainer.train_step
        return steps

    throughput: dict[str, dict] = {}
    harness: dict[str, HarnessStep] = {}
    if "a" in parts or "d" in parts:
        seconds = args.throughput_seconds if "a" in parts else max(3.0, args.throughput_seconds / 3)
        steps = build_throughput_steps()
        harness = {k: v for k, v in steps.items() if isinstance(v, HarnessStep)}
        print(f"(a) timing training steps: {len(steps)} configurations x {seconds:.0f} s ...", flush=True)
        throughput = bc.measure_throughput(steps, batches, device, seconds)
        rows = []
        for key, result in throughput.items():
            name, layout = key.split("|")
            label = {"ours": "ours (du.UNet), shared step", "diffusers": "diffusers UNet2DModel, shared step", "trainer": "ours, full du.Trainer.train_step"}[
                name
            ]
            row = {"key": key, "name": label, "layout": layout, "parameters": their_params if name == "diffusers" else ours_params, **result}
            other = throughput.get(f"diffusers|{layout}")
            row["vs_diffusers"] = result["images_per_s"] / other["images_per_s"] if other else math.nan
            rows.append(row)
        payload["throughput"] = rows
        best_ours = max(r["images_per_s"] for r in rows if r["key"].startswith("ours|"))
        best_theirs = max(r["images_per_s"] for r in rows if r["key"].startswith("diffusers|"))
        payload["throughput_ratio_best_layouts"] = best_ours / best_theirs
        table = bc.markdown_table(rows, THROUGHPUT_COLUMNS)
        sections.append(
            f"## (a) Training throughput (batch {batch_size}, {precision})\n\n{table}\n\nours / diffusers, each in its faster layout: **{best_ours / best_theirs:.2f}x**"
        )
        print(sections[-1] + "\n", flush=True)
        save()

    runs: dict[str, dict] = {}
    if "b" in parts:
        print(f"(b) training each run for {args.minutes} min ...", flush=True)
        quality_rows = []
        # ours
        trainer = du.Trainer(ours_model_config, ours_train_config, device=device)
        _, train_seconds = bc.timed(lambda: trainer.train(minutes=args.minutes, progress=False), device)
        runs["ours"] = {"trainer": trainer}
        for sampler, steps_count in dict.fromkeys(args.ours_samplers + [("ddim", args.ddim_steps)]):
            metrics, images = bc.sample_and_evaluate(trainer.sampling_model, trainer.schedule, args.samples, sampler, steps_count, device, batch_size=256)
            quality_rows.append(
                {
                    "run": "ours",
                    "steps_trained": trainer.step,
                    "images_seen": trainer.images_seen,
                    "train_seconds": train_seconds,
                    "loss": bc.mean_tail(trainer.losses),
                    "implementation": "du.sample",
                    **metrics,
                }
            )
            if sampler == "ddim" and steps_count == args.ddim_steps:
                runs["ours"]["ddim_row"] = quality_rows[-1]
            bc.save_figure(
                du.plot_grid(images[:32], title=f"ours, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"),
                out / f"samples_ours_{sampler}{steps_count}.png",
            )
            print(bc.markdown_table([quality_rows[-1]], QUALITY_COLUMNS).splitlines()[-1], flush=True)
        # diffusers, estimated steps for the cosine lr schedule's length
        their_rate = throughput.get("diffusers|contiguous", {}).get("images_per_s")
        if their_rate is None:
            probe = bc.measure_throughput(
                {"d": HarnessStep(DiffusersNet(diffusers_unet(channels, layers, attention)), device, precision, False, args.seed)},
                batches,
                device,
                5.0,
                rounds=1,
            )
            their_rate = probe["d"]["images_per_s"]
        estimated_steps = max(1, round(their_rate * args.minutes * 60 / batch_size))
        recipes = [
            DiffusersRecipe("diffusers-defaults", "linear", "epsilon", 1e-4, 500, "cosine", 0.9999 if args.defaults_ema else None),
            DiffusersRecipe("diffusers-best", "squaredcos_cap_v2", "v_prediction", args.best_lr, args.best_warmup, "constant_with_warmup", args.best_ema),
        ]
        payload["diffusers_recipes"] = recipes
        payload["estimated_diffusers_steps"] = estimated_steps
        for recipe in recipes:
            run = DiffusersRun(recipe, channels, layers, attention, device, precision, batch_size, args.seed, estimated_steps)
            _, train_seconds = bc.timed(lambda run=run: run.train(args.minutes), device)
            runs[recipe.name] = {"run": run}
            samplers = [("ddim", args.ddim_steps)] + ([("ddpm", args.diffusers_ddpm_steps)] if args.diffusers_ddpm_steps else [])
            for sampler, steps_count in samplers:
                images, seconds = bc.timed(lambda run=run, s=sampler, k=steps_count: run.sample(args.samples, s, k), device)
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
                    runs[recipe.name]["ddim_row"] = row
                bc.save_figure(
                    du.plot_grid(images[:32], title=f"{recipe.name}, {sampler} {steps_count}: valid {100 * metrics['valid']:.0f}%"),
                    out / f"samples_{recipe.name}_{sampler}{steps_count}.png",
                )
                print(bc.markdown_table([row], QUALITY_COLUMNS).splitlines()[-1], flush=True)
            payload["quality"] = quality_rows
            save()
        table = bc.markdown_table(quality_rows, QUALITY_COLUMNS)
        sections.append(f"## (b) Quality after {args.minutes} min of training each (batch {batch_size}, {precision})\n\n{table}")
        print("\n" + sections[-1] + "\n", flush=True)
        payload["quality"] = quality_rows
        save()

    if "c" in parts:
        sampling_rows = []
        if runs:
            for run in runs.values():
                if "ddim_row" in run:
                    sampling_rows.append({**run["ddim_row"], "trained": f"{args.minutes} min"})
        else:
            print(f"(c) sampling untrained networks ({args.samples} images, DDIM {args.ddim_steps}) ...", flush=True)
            torch.manual_seed(args.seed)
            ours_net = du.UNet(ours_model_config).to(device)
            metrics, _ = bc.sample_and_evaluate(ours_net, du.NoiseSchedule.from_config(ours_model_config), args.samples, "ddim", args.ddim_steps, device)
            sampling_rows.append({"run": "ours", "implementation": "du.sample", "trained": "no", **metrics})
            run = DiffusersRun(
                DiffusersRecipe("diffusers", "linear", "epsilon", 1e-4, 0, "constant", None),
                channels,
                layers,
                attention,
                device,
                precision,
                batch_size,
                args.seed,
                1,
            )
            images, seconds = bc.timed(lambda: run.sample(args.samples, "ddim", args.ddim_steps), device)
            sampling_rows.append(
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
        payload["sampling"] = sampling_rows
        table = bc.markdown_table(sampling_rows, SAMPLING_COLUMNS)
        sections.append(f"## (c) Sampling {args.samples} images with {args.ddim_steps} DDIM steps\n\n{table}")
        print(sections[-1] + "\n", flush=True)
        save()

    if "d" in parts:
        print("(d) counting FLOPs and timing torch.mm ...", flush=True)
        flop_rows = []
        mm_fp32 = bc.matmul_flops_per_second(device, torch.float32)
        mm_train = mm_fp32 if precision == "fp32" else bc.matmul_flops_per_second(device, torch.bfloat16 if precision == "bf16" else torch.float16)
        for name in ("ours", "diffusers"):
            keys = [k for k in harness if k.startswith(name + "|")]
            best_key = max(keys, key=lambda k: throughput[k]["images_per_s"])
            step = harness[best_key]
            x0 = batches[0][: args.flop_batch]
            flops = bc.training_flops_per_image(lambda step=step, x0=x0: step.loss(x0), len(x0))
            step.optimizer.zero_grad(set_to_none=True)
            rate = throughput[best_key]["images_per_s"]
            achieved = flops * rate
            flop_rows.append(
                {
                    "name": f"{'ours (du.UNet)' if name == 'ours' else 'diffusers UNet2DModel'}, {best_key.split('|')[1]}",
                    "parameters": ours_params if name == "ours" else their_params,
                    "gflops_per_image": flops / 1e9,
                    "images_per_s": rate,
                    "achieved_gflops": achieved / 1e9,
                    "share_fp32": achieved / mm_fp32,
                    "share_train_precision": achieved / mm_train,
                }
            )
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32  # du.Trainer turns TF32 on for CUDA
        payload["flops"] = {"rows": flop_rows, "mm_fp32_gflops": mm_fp32 / 1e9, "mm_train_precision_gflops": mm_train / 1e9, "tf32": tf32}
        table = bc.markdown_table(flop_rows, FLOP_COLUMNS)
        sections.append(
            f"## (d) Hardware efficiency\n\nmeasured square torch.mm: {mm_fp32 / 1e9:.1f} GFLOP/s fp32{' (TF32 on)' if tf32 else ''}"
            + ("" if precision == "fp32" else f", {mm_train / 1e9:.1f} GFLOP/s {precision}")
            + f" on {env['device_name']}; FLOPs = matmul/conv multiply-adds x 2 (FlopCounterMode), forward + backward\n\n{table}"
        )
        print(sections[-1] + "\n", flush=True)
        save()

    save()
    print(f"saved {out / 'vs_diffusers.json'} and vs_diffusers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
