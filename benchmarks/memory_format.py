"""Memory format: the full du.Trainer.train_step with channels_last on and off, same device, one run.

Which memory layout trains faster on this device? Both trainers start from the same
seed, and their steps are timed in alternating rounds (bc.measure_throughput), so a busy
machine slows them alike. The default model of the device is measured.
(benchmarks/gpu.py measures the same on CUDA, with compilation.)

Example (the lead's run on the 2-core CPU, about 3 min):
    python benchmarks/memory_format.py --seconds 60 --out benchmarks/results/memory_format
Smoke test (seconds):
    python benchmarks/memory_format.py --seconds 1 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)

import diffusion_utils as du  # noqa: E402

COLUMNS = [
    ("layout", "layout", ""),
    ("steps", "steps timed", ""),
    ("images_per_s", "images/s", ".1f"),
    ("ratio", "vs contiguous", ".3f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/memory_format")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="timed seconds per layout, split over --rounds alternating rounds (default 60)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    device = bc.setup(args)
    model_config, train_config = bc.apply_overrides(*du.default_configs(device), args)
    env = bc.environment(device)
    model_line = f"{du.describe_model(du.UNet(model_config))}; batch {train_config.batch_size}"
    print(f"# Memory format\n{bc.environment_line(env)}\n{model_line}", flush=True)

    trainers = {
        name: du.Trainer(model_config, dataclasses.replace(train_config, channels_last=channels_last), device=device)
        for name, channels_last in (("contiguous", False), ("channels_last", True))
    }
    batches = [
        (images.to(device), condition.to(device))
        for images, condition in itertools.islice(du.training_batches(train_config.batch_size, args.seed), 4)
    ]
    steps = {name: _step_of(trainer) for name, trainer in trainers.items()}
    results = bc.measure_throughput(steps, batches, device, args.seconds, args.rounds)
    base = results["contiguous"]["images_per_s"]
    rows = [
        {"layout": name, "steps": r["steps"], "images_per_s": r["images_per_s"], "ratio": r["images_per_s"] / base}
        for name, r in results.items()
    ]
    table = bc.markdown_table(rows, COLUMNS)
    print(f"\n{table}")
    out = bc.prepare_out(args.out)
    payload = {"benchmark": "memory_format", "environment": env, "args": vars(args), "rows": rows}
    bc.save_json(out / "memory_format.json", payload)
    bc.save_text(out / "memory_format.md", f"# Memory format\n\n{bc.environment_line(env)}\n\n{table}\n")
    return 0


def _step_of(trainer: du.Trainer):
    """One training step on an (images, condition) batch; the condition reaches only a conditional model."""
    return lambda batch: trainer.train_step(*batch)


if __name__ == "__main__":
    sys.exit(main())
