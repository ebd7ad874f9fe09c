"""Sampling speed: seconds, images/s and quality for each sampler and step count.

Loads a checkpoint (du.load_model: the EMA weights when saved), or, without --checkpoint, trains
the device's default recipe for --train-minutes first (and saves it to --out/model.pt so a rerun
can reuse it with --checkpoint). Then, for each sampler:steps in --samplers, it times du.sample
drawing --n images (the device synced around it) and scores them with du.evaluate_samples.
The speed-up is against 1000-step DDPM: measured when ddpm:1000 is in the list, else
estimated from the per-step time of the longest DDPM run (marked "est.").

Memory: one large run (--big-n images in chunks of --chunk, with --big-sampler) is
compared with a run of a single chunk; peak memory stays bounded when the two peaks differ by
little more than the stored output images (--big-n x 16 KiB). CPU: resident memory polled
from /proc; CUDA: torch.cuda.max_memory_allocated.

Example (the lead's run on the CPU: ~1 h with ddpm:1000 at --n 256 on 2 cores; drop ddpm:1000
or lower --n to shorten it):
    python benchmarks/sampling_speed.py --checkpoint runs/recipe.pt --n 256 --big-n 4096
Smoke test (seconds):
    python benchmarks/sampling_speed.py --train-steps 5 --n 8 --samplers ddpm:20,ddim:10,ddim:5 \\
        --big-n 64 --chunk 16 --big-sampler ddim:2 --base-channels 8 --channel-mults 1,2 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)

import diffusion_utils as du  # noqa: E402

DEFAULT_SAMPLERS = "ddpm:1000,ddpm:250,ddpm:100,ddpm:50,ddim:100,ddim:50,ddim:20,ddim:10"

COLUMNS = [
    ("sampler", "sampler", ""),
    ("steps", "steps", ""),
    ("n", "n", ""),
    ("sample_seconds", "seconds", ".2f"),
    ("images_per_s", "images/s", ".2f"),
    ("ms_per_step_per_image", "ms / (step·image)", ".3f"),
    ("speedup_text", "speed-up vs DDPM 1000", ""),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1", ".2f"),
    ("position_w1", "position W1", ".2f"),
]
MEMORY_COLUMNS = [
    ("run", "run", ""),
    ("n", "images", ""),
    ("batch_size", "chunk", ""),
    ("sampler", "sampler", ""),
    ("steps", "steps", ""),
    ("seconds", "seconds", ".2f"),
    ("peak_mb", "peak MiB", ".1f"),
    ("increase_mb", "increase MiB", ".1f"),
    ("output_mb", "output images MiB", ".1f"),
    ("memory_measure", "measured as", ""),
]


def load_or_train(args: argparse.Namespace, device, out: Path):
    if args.checkpoint:
        model, schedule = du.load_model(args.checkpoint, device=device)
        return model, schedule, f"checkpoint {args.checkpoint}"
    model_config, train_config = bc.apply_overrides(*du.default_configs(device), args)
    trainer = du.Trainer(model_config, train_config, device=device)
    budget = f"{args.train_steps} steps" if args.train_steps else f"{args.train_minutes} min"
    print(f"no --checkpoint: training {du.describe_model(trainer.model)} for {budget}", flush=True)
    trainer.train(
        steps=args.train_steps,
        minutes=None if args.train_steps else args.train_minutes,
        progress=False,
        checkpoint_path=out / "model.pt",
        checkpoint_every=10**9,
    )
    return trainer.sampling_model.eval(), trainer.schedule, f"trained here: {trainer.step} steps, {trainer.images_seen} images (saved {out / 'model.pt'})"


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/sampling_speed")
    parser.add_argument("--checkpoint", help="a checkpoint from diffusion_utils.py train (default: train one here)")
    parser.add_argument("--train-minutes", type=float, default=10.0, help="without --checkpoint: minutes to train the default recipe (default 10)")
    parser.add_argument("--train-steps", type=int, help="without --checkpoint: train this many steps instead of --train-minutes")
    parser.add_argument(
        "--samplers", type=bc.parse_samplers, default=bc.parse_samplers(DEFAULT_SAMPLERS), help=f"sampler:steps list (default {DEFAULT_SAMPLERS})"
    )
    parser.add_argument("--n", type=int, default=256, help="images per sampler (default 256)")
    parser.add_argument("--sample-seed", type=int, default=1234, help="sampling seed (same noise for every sampler)")
    parser.add_argument("--big-n", type=int, default=4096, help="images in the memory run (0 skips it; default 4096)")
    parser.add_argument(
        "--big-sampler",
        type=bc.parse_samplers,
        default=bc.parse_samplers("ddim:10"),
        help="sampler:steps of the memory run (default ddim:10; memory does not depend on the step count)",
    )
    parser.add_argument("--chunk", type=int, default=256, help="images per sampling chunk (du.sample's batch_size; default 256)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    chunk = args.chunk

    device = bc.setup(args)
    out = bc.prepare_out(args.out)
    env = bc.environment(device)
    print(f"# Sampling speed\n{bc.environment_line(env)}", flush=True)
    model, schedule, source = load_or_train(args, device, out)
    print(f"model: {du.describe_model(model)}; {source}; prediction {model.config.prediction}, schedule {model.config.schedule}\n", flush=True)
    # Warm-up (first-call allocations, kernel selection) outside the timings.
    du.sample(model, schedule, min(args.n, chunk), steps=2, sampler="ddim", seed=0, batch_size=chunk, progress=False)

    rows = []
    for sampler, steps in args.samplers:
        row, _ = bc.sample_and_evaluate(model, schedule, args.n, sampler, steps, device, seed=args.sample_seed, batch_size=chunk)
        row["ms_per_step_per_image"] = 1000 * row["sample_seconds"] / (steps * args.n)
        rows.append(row)
        print(f"{sampler} {steps} steps: {row['sample_seconds']:.2f} s, valid {100 * row['valid']:.1f}%", flush=True)

    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    ddpm_rows = [r for r in rows if r["sampler"] == "ddpm"] or rows
    longest = max(ddpm_rows, key=lambda r: r["steps"])
    baseline_seconds = reference["sample_seconds"] if reference else longest["sample_seconds"] / longest["steps"] * 1000
    for row in rows:
        row["speedup_vs_ddpm1000"] = baseline_seconds / row["sample_seconds"]
        row["speedup_estimated"] = reference is None
        row["speedup_text"] = f"{row['speedup_vs_ddpm1000']:.1f}x" + ("" if reference else " (est.)")

    memory_rows = []
    if args.big_n:
        big_sampler, big_steps = args.big_sampler[0]
        for label, n in (("one chunk", min(chunk, args.big_n)), ("large, chunked", args.big_n)):
            with bc.PeakMemory(device) as memory:
                _, seconds = bc.timed(
                    lambda n=n: du.sample(model, schedule, n, steps=big_steps, sampler=big_sampler, seed=args.sample_seed, batch_size=chunk, progress=False),
                    device,
                )
            memory_rows.append(
                {
                    "run": label,
                    "n": n,
                    "batch_size": chunk,
                    "sampler": big_sampler,
                    "steps": big_steps,
                    "seconds": seconds,
                    "output_mb": n * 64 * 64 * 4 / 2**20,
                    **memory.as_dict(),
                }
            )
        small, big = memory_rows
        extra = big["increase_mb"] - small["increase_mb"] - (big["output_mb"] - small["output_mb"])
        memory_note = f"large run used {extra:+.1f} MiB beyond one chunk's peak plus its larger output tensor: {'bounded' if extra < max(64.0, 0.25 * small['increase_mb']) else 'GROWS with n'}"
    else:
        memory_note = "memory run skipped (--big-n 0)"

    table = bc.markdown_table(rows, COLUMNS)
    memory_table = bc.markdown_table(memory_rows, MEMORY_COLUMNS) if memory_rows else ""
    text = f"# Sampling speed\n\n{bc.environment_line(env)}\n\nmodel: {du.describe_model(model)}; {source}\n\n{table}\n\n## Memory\n\n{memory_table}\n\n{memory_note}\n"
    print("\n" + text)
    print(f"process lifetime peak RSS {bc.max_rss_mb():.0f} MiB")
    bc.save_text(out / "sampling_speed.md", text)
    bc.save_json(
        out / "sampling_speed.json",
        {
            "benchmark": "sampling_speed",
            "environment": env,
            "args": vars(args),
            "model": model.config,
            "source": source,
            "rows": rows,
            "memory": memory_rows,
            "memory_note": memory_note,
            "lifetime_peak_rss_mb": bc.max_rss_mb(),
        },
    )

    fig = bc.line_plot(
        [
            (
                f"seconds for {args.n} images",
                {s: ([r["steps"] for r in rows if r["sampler"] == s], [r["sample_seconds"] for r in rows if r["sampler"] == s]) for s in du.SAMPLERS},
            ),
            ("valid shapes", {s: ([r["steps"] for r in rows if r["sampler"] == s], [r["valid"] for r in rows if r["sampler"] == s]) for s in du.SAMPLERS}),
        ],
        "sampling steps",
        f"Sampling speed and quality on {env['device_name']}",
        percent=(False, True),
        ylims=((0, None), (0, 1.02)),
    )
    for ax in fig.axes:
        ax.set_xscale("log")
    bc.save_figure(fig, out / "sampling_speed.png")
    print(f"saved {out / 'sampling_speed.json'}, sampling_speed.md and sampling_speed.png")
    return 0 if all(math.isfinite(r["sample_seconds"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
