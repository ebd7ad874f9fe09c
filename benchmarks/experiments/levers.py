"""Which change to the CPU recipe buys quality? Step-budgeted runs of named variants, scored at the end.

Each variant trains a fresh model for --steps optimiser steps (so a busy machine does not change its result; 5,850
steps are 5 minutes of the previous recipe on the 2-core CPU, 3,150 three of the recipe), then draws --samples
images with DDPM-100 (a conditional one also --asked-samples real shapes' requests). RESULTS.md, "What each lever buys".

Variants of the previous recipe (--base previous, bc.previous_recipe: unconditional, constant lr 1e-3):
    previous              itself
    cosine-1e-3           + a cosine decay of the lr to 0 at the end of the budget
    cosine                + the decay, at lr 2e-3
    gamma-20              + the decay at lr 2e-3, min-SNR gamma 20 instead of 5
    conditional           + the decay at lr 2e-3, requests with each field hidden with p = 0.5 (scored unconditionally)
The notebook's exercises, each one change to the current recipe (--base recipe, du.default_configs("cpu", "diffusion")):
    recipe, linear (schedule), eps (target), no-ema, constant-lr

RESULTS.md gives the commands of its tables (about 10 minutes a run on the 2-core CPU).
Smoke test (seconds):
    python benchmarks/experiments/levers.py --steps 3 --samples 8 --asked-samples 4 --variants previous,conditional \\
        --threads 1 --base-channels 8 --channel-mults 1,2 --batch-size 8 --out /tmp/levers_smoke
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as bc  # noqa: E402

import diffusion_utils as du  # noqa: E402

COSINE = {"train": {"lr": 2e-3, "lr_schedule": "cosine"}}
CONDITIONAL = {"model": {"conditional": True}, "train": {"condition_dropout": 0.5}}
VARIANTS: dict[str, list[dict]] = {
    "previous": [],
    "cosine-1e-3": [{"train": {"lr_schedule": "cosine"}}],
    "cosine": [COSINE],
    "gamma-20": [COSINE, {"train": {"min_snr_gamma": 20.0}}],
    "conditional": [COSINE, CONDITIONAL],
    # The notebook's exercises (section 12), each one change to the recipe: run them with --base recipe.
    "recipe": [],
    "linear": [{"model": {"schedule": "linear"}}],
    "eps": [{"model": {"prediction": "eps"}}],
    "no-ema": [{"train": {"ema_decay": None}}],
    "constant-lr": [{"train": {"lr_schedule": "constant"}}],
}
BASES = {"previous": bc.previous_recipe("cpu"), "recipe": du.default_configs("cpu", "diffusion")}
SAMPLING_SEED, REQUEST_SEED = 123, 99
COLUMNS = bc.columns(
    "variant; seed; steps; valid||%; mid_gray|mid-gray|%; circle_share||.2f; size_w1|size W1 (px)|.2f",
    "position_w1|position W1 (px)|.2f; asked_class_accuracy|asked: class accuracy|%",
    "asked_center_error|asked: centre error (px)|.2f; asked_size_error|asked: size error (px)|.2f",
)


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/levers")
    parser.add_argument("--variants", default="previous,cosine-1e-3,cosine,gamma-20,conditional", help="comma list")
    parser.add_argument("--base", choices=BASES, default="previous", help="what the variants change (default previous)")
    parser.add_argument("--seeds", type=bc.parse_ints, default=[0], help="training seeds (default 0)")
    parser.add_argument("--steps", type=bc.positive_int, default=5850, help="optimiser steps per run (default 5850)")
    parser.add_argument("--samples", type=bc.positive_int, default=512, help="images scored per run (default 512)")
    parser.add_argument("--asked-samples", type=int, default=256, help="conditional variants: requests (default 256)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def configs(name: str, args, seed: int) -> tuple[du.ModelConfig, du.TrainConfig]:
    """The base recipe with the variant's changes, then the command line's overrides and the seed."""
    model, train = BASES[args.base]
    for change in VARIANTS[name]:
        model = dataclasses.replace(model, **change.get("model", {}))
        train = dataclasses.replace(train, **change.get("train", {}))
    model, train = bc.apply_overrides(model, train, args)
    return model, dataclasses.replace(train, seed=seed)


def run_one(name: str, seed: int, args, device) -> dict:
    """Train one variant for --steps and score its samples (and, when conditional, its answers to requests)."""
    model, train = configs(name, args, seed)
    trainer = du.Trainer(model, train, device=device)
    started = time.perf_counter()
    trainer.train(steps=args.steps, progress=False)
    row = {"variant": name, "seed": seed, "steps": args.steps, "train_seconds": time.perf_counter() - started}
    sampling = {"steps": 100, "sampler": "ddpm", "seed": SAMPLING_SEED, "progress": False}
    result = du.sample(trainer.sampling_model, trainer.schedule, args.samples, **sampling)
    row |= du.evaluate_samples(result.images)
    if model.conditional and args.asked_samples > 0:
        asked = du.make_shapes(args.asked_samples, seed=REQUEST_SEED).condition()
        result = du.sample(trainer.sampling_model, trainer.schedule, len(asked), condition=asked, **sampling)
        row |= {f"asked_{key}": value for key, value in du.evaluate_requests(result.images, asked).items()}
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    rows = []
    for seed in args.seeds:
        for name in args.variants.split(","):
            rows.append(run_one(name, seed, args, device))
            print(bc.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
            bc.save_json(out / "levers.json", {"environment": env, "rows": rows})
    sections = [bc.markdown_table(rows, COLUMNS)]
    bc.write_report(out, "levers", "Levers at equal optimiser steps", env, sections, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
