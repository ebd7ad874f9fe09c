"""Which training precision is fastest for the default GPU model: bf16 / fp16 autocast or fp32 (TF32)?

gpu.py measured each variant once, one after another; this script times them in alternating
rounds (a busy or warming card slows them alike), eager and then with torch.compile, using the
Trainer's own training step, pre-made pinned batches and the GPU recipe (du.default_configs).
Prints a markdown table and saves gpu_precision.json / .md in --out.

Example (on the GPU machine, about 3 minutes):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_precision.py --out $OUT
Smoke test (CPU: fp32 only, no compile):
    python benchmarks/gpu_precision.py --smoke --threads 1
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402

import diffusion_utils as du  # noqa: E402

COLUMNS = [
    ("variant", "variant", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("vs_first", "vs bf16, same mode", ".2f"),
    ("ready_seconds", "first 3 steps s", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/gpu_precision")
    parser.add_argument("--smoke", action="store_true", help="tiny model, fp32 only, no compile (a CPU check of this script)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per variant, over 3 rounds (default 18; smoke 1.5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.base_channels, args.channel_mults, args.batch_size = args.base_channels or 8, args.channel_mults or [1, 2], args.batch_size or 8
    device = bc.setup(args)
    env = bc.environment(device)
    model_config, train_config = bc.apply_overrides(*du.default_configs("cuda"), args)
    batches = [b.pin_memory() if device.type == "cuda" else b for b in itertools.islice(du.training_batches(train_config.batch_size, args.seed), 8)]
    seconds = args.seconds or (1.5 if args.smoke else 18.0)
    precisions = ["bf16", "fp32", "fp16"] if device.type == "cuda" else ["fp32"]
    compiled = [False] if args.no_compile or device.type != "cuda" else [False, True]
    header = f"# Training precision: {env['device_name']}, {env['date'][:10]}\n\n{bc.environment_line(env)}\n\nmodel: {du.describe_model(du.UNet(model_config))}; batch {train_config.batch_size}"
    print(header, flush=True)
    rows = []
    for compile_model in compiled:
        trainers = {}
        for precision in precisions:
            name = f"{'torch.compile' if compile_model else 'eager'}, {precision}" + (
                " (TF32 matmuls)" if precision == "fp32" and device.type == "cuda" else ""
            )
            trainer = du.Trainer(model_config, dataclasses.replace(train_config, compile=compile_model), device=device, precision=precision)
            _, ready_seconds = bc.timed(lambda trainer=trainer: [trainer.train_step(batches[k]) for k in range(3)], device)  # compiles, if compiled
            trainers[name] = (trainer, ready_seconds)
            print(f"{name}: ready in {ready_seconds:.1f} s", flush=True)
        results = bc.measure_throughput({name: t.train_step for name, (t, _) in trainers.items()}, batches, device, seconds, rounds=3)
        first = results[next(iter(results))]["images_per_s"]
        for name, result in results.items():
            rows.append({"variant": name, **result, "vs_first": result["images_per_s"] / first, "ready_seconds": trainers[name][1]})
            print(f"{name}: {result['images_per_s']:,.0f} images/s", flush=True)
        del trainers
    table = bc.markdown_table(rows, COLUMNS)
    print("\n" + table)
    out = bc.prepare_out(args.out)
    bc.save_json(out / "gpu_precision.json", {"benchmark": "gpu_precision", "environment": env, "args": vars(args), "rows": rows, "smoke": args.smoke})
    bc.save_text(out / "gpu_precision.md", f"{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
