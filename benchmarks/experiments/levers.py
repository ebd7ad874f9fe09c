"""Which change to the CPU recipe buys quality per minute? Step-budgeted runs of named variants, scored at the end.

Each variant trains a fresh model for a number of optimiser steps (not minutes), so a busy machine slows a run
down but does not change its result; the step count of a variant is chosen so that it matches a wall-clock budget
on a quiet machine (--minutes, at the variant's measured images/s: --steps-per-second gives it, or the script
measures it first with --measure). At the end the sampling model draws --samples images with DDPM (100 steps,
one fixed sampling seed) and du.evaluate_samples scores them; a conditional variant is also asked for shapes.

Why: a 5-minute CPU run has few steps to spare, and each lever (learning-rate decay, conditioning,
the loss weight, batch size) costs or saves time per step. Comparing at equal wall-clock time, with the speed of
each variant measured apart from its quality, answers "does this buy quality per minute?" even on a shared machine.

Variants (each is the "previous" recipe, the CPU recipe before this round, plus the named changes):
    previous       du.ModelConfig(conditional=False), du.TrainConfig(lr_schedule="constant")
    cosine         + lr 2e-3 with a cosine decay to 0 at the end of the budget
    conditional    + cosine + requests with condition dropout; scored unconditionally
    gamma-20       + cosine + min-SNR gamma 20 instead of 5
    batch-64       + cosine + batch 64 (half the steps, 100 warm-up steps)

The notebook's exercises, each one change to the current recipe (--base recipe):
    recipe         the recipe itself, du.default_configs("cpu")
    linear         the linear schedule of Ho et al.
    eps            the eps target
    no-ema         sample from the raw weights
    constant-lr    no decay of the learning rate

Full run (the 5-minute equivalents, seeds 0 and 1, about 70 minutes on a 2-core CPU):
    python benchmarks/experiments/levers.py --measure --minutes 5 --seeds 0,1 --out benchmarks/results/levers
The exercises (3-minute equivalents, about 20 minutes):
    python benchmarks/experiments/levers.py --base recipe --variants recipe,linear,eps,no-ema,constant-lr \\
        --minutes 3 --measure --samples 256 --out benchmarks/results/exercises
Smoke test (seconds):
    python benchmarks/experiments/levers.py --steps 3 --samples 8 --variants previous,conditional --threads 1 \\
        --base-channels 8 --channel-mults 1,2 --batch-size 8 --out /tmp/levers_smoke
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as bc  # noqa: E402

import diffusion_utils as du  # noqa: E402

PREVIOUS = (du.ModelConfig(conditional=False), du.TrainConfig(lr_schedule="constant", condition_dropout=0.0))
COSINE = {"train": {"lr": 2e-3, "lr_schedule": "cosine"}}
VARIANTS: dict[str, list[dict]] = {
    "previous": [],
    "cosine": [COSINE],
    "conditional": [COSINE, {"model": {"conditional": True}, "train": {"condition_dropout": 0.5}}],
    "gamma-20": [COSINE, {"train": {"min_snr_gamma": 20.0}}],
    "batch-64": [COSINE, {"train": {"batch_size": 64, "warmup_steps": 100}}],
    # The notebook's exercises (section 12), each one change to the recipe: run them with --base recipe.
    "recipe": [],
    "linear": [{"model": {"schedule": "linear"}}],
    "eps": [{"model": {"prediction": "eps"}}],
    "no-ema": [{"train": {"ema_decay": None}}],
    "constant-lr": [{"train": {"lr_schedule": "constant"}}],
}
BASES = {"previous": PREVIOUS, "recipe": du.default_configs("cpu")}


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/levers")
    parser.add_argument("--variants", default="previous,cosine,conditional,gamma-20,batch-64", help="comma list")
    parser.add_argument("--base", choices=BASES, default="previous", help="what the variants change (default previous)")
    parser.add_argument("--seeds", type=bc.parse_ints, default=[0], help="training seeds (default 0)")
    parser.add_argument("--minutes", type=float, default=5.0, help="the wall-clock budget the steps stand for")
    parser.add_argument("--steps", type=int, help="a fixed step count for every variant instead (smoke tests)")
    parser.add_argument("--measure", action="store_true", help="measure each variant's steps/s first (10 s each)")
    parser.add_argument("--samples", type=int, default=512, help="images scored per run (default 512)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def configs(name: str, args, seed: int) -> tuple[du.ModelConfig, du.TrainConfig]:
    model, train = BASES[args.base]
    for change in VARIANTS[name]:
        model = dataclasses.replace(model, **change.get("model", {}))
        train = dataclasses.replace(train, **change.get("train", {}))
    model, train = bc.apply_overrides(model, train, args)
    return model, dataclasses.replace(train, seed=seed)


def steps_per_second(model: du.ModelConfig, train: du.TrainConfig, device, seconds: float = 10.0) -> float:
    """Training steps per second of a variant on this machine, after a short warm-up."""
    trainer = du.Trainer(model, train, device=device)
    trainer.train(steps=10, progress=False)
    start, first = time.perf_counter(), trainer.step
    trainer.train(minutes=seconds / 60, progress=False)
    return (trainer.step - first) / (time.perf_counter() - start)


def run_one(name: str, seed: int, steps: int, args, device) -> dict:
    model, train = configs(name, args, seed)
    trainer = du.Trainer(model, train, device=device)
    started = time.perf_counter()
    trainer.train(steps=steps, progress=False)
    seconds = time.perf_counter() - started
    result = du.sample(trainer.sampling_model, trainer.schedule, args.samples, steps=100, sampler="ddpm", seed=123)
    row = {
        "variant": name,
        "seed": seed,
        "steps": steps,
        "train_seconds": seconds,
        **du.evaluate_samples(result.images),
    }
    if model.conditional:
        asked = du.make_shapes(args.samples, seed=99).condition()
        result = du.sample(trainer.sampling_model, trainer.schedule, args.samples, steps=100, seed=123, condition=asked)
        row["asked"] = du.evaluate_requests(result.images, asked)
    return row


COLUMNS = [
    ("variant", "variant", ""),
    ("seed", "seed", ""),
    ("steps", "steps", ""),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1 (px)", ".2f"),
    ("position_w1", "position W1 (px)", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    out = bc.prepare_out(args.out)
    names = args.variants.split(",")
    rates = {}
    if args.steps is None:
        for name in names:
            rates[name] = steps_per_second(*configs(name, args, 0), device) if args.measure else None
        missing = [n for n, r in rates.items() if r is None]
        if missing:
            raise SystemExit(f"levers.py: give --measure (or --steps) to size the runs of {', '.join(missing)}")
    rows = []
    for seed in args.seeds:
        for name in names:
            steps = args.steps or round(rates[name] * args.minutes * 60)
            rows.append(run_one(name, seed, steps, args, device))
            print(bc.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
            bc.save_json(out / "levers.json", {"environment": bc.environment(device), "rates": rates, "rows": rows})
    table = bc.markdown_table(rows, COLUMNS)
    env_line = bc.environment_line(bc.environment(device))
    bc.save_text(out / "levers.md", f"# Levers at equal wall-clock time\n\n{env_line}\n\n{table}\n")
    print(f"\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
