"""Training speed on a GPU (or any device): layouts, precisions, torch.compile, and whether the data keeps up.

For the device's recipe (du.default_configs, or --recipe previous) measures, in this order: images/s of
du.Trainer.train_step on pinned batches, every variant timed in alternating rounds (contiguous and channels_last in
du.choose_precision's precision, the device's other precisions; peak GPU memory each); whether data generation keeps
up (du.training_batches alone, with and without the config's data_workers, and du.Trainer.train end to end); last,
on CUDA, torch.compile (--no-compile skips it). On a CPU (fp32 only) it answers whether channels_last pays there.
RESULTS.md, "On a GPU" (quality there is time_to_quality.py with --device cuda).

Example (on the GPU machine, about 3 minutes):
    python benchmarks/gpu.py --recipe previous --out benchmarks/results/gpu
Smoke test (seconds, on the CPU):
    python benchmarks/gpu.py --smoke --device cpu --seconds 1 --threads 1 --out /tmp/gpu_smoke
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import sys
import time

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch

import diffusion_utils as du

SMOKE = {"base_channels": 8, "channel_mults": [1, 2], "batch_size": 8}
TRAIN_COLUMNS = bc.columns(
    "variant|training variant; precision; images_per_s|images/s|,.0f; vs_first|vs first row|.2f",
    "ready_seconds|set-up + 3 steps s|.1f; peak_mb|peak MiB|,.0f",
)
DATA_COLUMNS = [("source", "source", ""), ("images_per_s", "images/s", ",.0f"), ("vs_training", "vs training", ".2f")]


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/gpu")
    parser.add_argument("--recipe", choices=("recipe", "previous"), default="recipe", help="default: the recipe")
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per variant (default 12)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (CUDA only)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model (checks the script on any device)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    for key, value in SMOKE.items() if args.smoke else ():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def configs(args, device) -> tuple[du.ModelConfig, du.TrainConfig]:
    recipe = bc.previous_recipe(device) if args.recipe == "previous" else du.default_configs(device, "diffusion")
    return bc.apply_overrides(*recipe, args)


def variants(device, train: du.TrainConfig) -> list[tuple[str, du.TrainConfig, str | None]]:
    """(name, train config, precision) of each eager variant: both layouts, then the other precisions."""
    found = [
        ("contiguous", dataclasses.replace(train, channels_last=False), None),
        ("channels_last", dataclasses.replace(train, channels_last=True), None),
    ]
    if device.type == "cuda":  # a CPU runs fp32 only
        others = ["fp32", "fp16"] + (["bf16"] if du.is_ampere_or_newer(device) else [])
        layout = "channels_last" if train.channels_last else "contiguous"
        found += [(f"{layout}, {p}", train, p) for p in others if p != du.choose_precision(device)]
    return found


def build(model: du.ModelConfig, train: du.TrainConfig, precision: str | None, batches, device) -> tuple:
    """A trainer warmed up by three steps, and its set-up figures (seconds, peak GPU memory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer = du.Trainer(model, train, device=device, precision=precision)
    for batch in batches[:3]:
        bc.train_step(trainer, batch)
    bc.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return trainer, {"precision": trainer.precision, "ready_seconds": time.perf_counter() - start, "peak_mb": peak}


def time_variants(model, found, batches, device, seconds: float) -> list[dict]:
    """Each variant's row: images/s in alternating rounds, with its set-up figures; a failure becomes a row."""
    built, failed = {}, []
    for name, train, precision in found:
        try:
            built[name] = build(model, train, precision, batches, device)
        except Exception as error:  # a failed compile or precision must not cost the rest of the run
            failed.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:300]})
    rows = []
    steps = {name: (lambda batch, t=trainer: bc.train_step(t, batch)) for name, (trainer, _) in built.items()}
    for name, result in bc.measure_throughput(steps, batches, device, seconds).items():
        rows.append({"variant": name, **built[name][1], **result})
        print(f"{name}: {result['images_per_s']:,.0f} images/s", flush=True)
    rows += failed
    built.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def data_rate(batch_size: int, seed: int, seconds: float, workers: int = 0) -> float:
    """images/s of du.training_batches alone (after its first batch, so worker start-up is excluded)."""
    batches = du.training_batches(batch_size, seed, 0, workers)
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    return count * batch_size / (time.perf_counter() - start)


def data_supply(model, train, device, seconds: float, training_rate: float) -> tuple[list[dict], str]:
    """The data alone (one process, and the config's workers), then du.Trainer.train end to end."""
    rows = [{"source": "du.training_batches, 1 process", "images_per_s": data_rate(train.batch_size, 0, seconds)}]
    if train.data_workers:
        rate = data_rate(train.batch_size, 0, seconds, train.data_workers)
        rows.append({"source": f"du.training_batches, {train.data_workers} workers", "images_per_s": rate})
    trainer = du.Trainer(model, train, device=device)
    trainer.train(steps=3, progress=False)  # warm-up (and worker start-up) outside the timing
    seen = trainer.images_seen
    _, elapsed = bc.timed(lambda: trainer.train(minutes=seconds / 60, progress=False), device)
    end_to_end = (trainer.images_seen - seen) / elapsed
    rows.append({"source": "du.Trainer.train end to end", "images_per_s": end_to_end})
    for row in rows:
        row["vs_training"] = row["images_per_s"] / training_rate
    verdict = "keeps up" if end_to_end >= 0.9 * training_rate else "is a bottleneck"
    share = end_to_end / training_rate
    return rows, f"Data generation {verdict}: end to end, training runs at {share:.0%} of the rate."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, train = configs(args, device)
    env = bc.environment(device, __file__)
    print(f"{bc.environment_line(env)}\n{du.describe_model(du.UNet(model))}; batch {train.batch_size}", flush=True)
    pinned = device.type == "cuda"
    batches = [
        (images.pin_memory(), condition.pin_memory()) if pinned else (images, condition)
        for images, condition in itertools.islice(du.training_batches(train.batch_size, args.seed), 8)
    ]
    rows = time_variants(model, variants(device, train), batches, device, args.seconds)
    training_rate = rows[0].get("images_per_s", math.nan)
    data_rows, verdict = data_supply(model, train, device, min(5.0, args.seconds), training_rate)
    if device.type == "cuda" and not args.no_compile:
        compiled = dataclasses.replace(train, compile_model=True)
        rows += time_variants(model, [("torch.compile", compiled, None)], batches, device, args.seconds)
    for row in rows:
        row["vs_first"] = row.get("images_per_s", math.nan) / training_rate
    sections = [
        f"model: {du.describe_model(du.UNet(model))} ({args.recipe}); batch {train.batch_size}",
        f"## Training throughput (train_step, alternating rounds)\n\n{bc.markdown_table(rows, TRAIN_COLUMNS)}",
        f"## Does data generation keep up?\n\n{bc.markdown_table(data_rows, DATA_COLUMNS)}\n\n{verdict}",
    ]
    payload = {"model": model, "train": train, "training": rows, "data": data_rows}
    title = f"Training speed on {env['device_name']}"
    bc.write_report(bc.prepare_out(args.out), "gpu", title, env, sections, **payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
