"""Fast on a GPU: training speed, data supply, sampling speed, memory and time to 98% valid shapes.

Issue "Fast on a GPU". One invocation does everything, within --total-minutes of wall time
(each section checks the clock and is skipped, with a note, when too little is left), so it fits
one call on a borrowed GPU machine. With the default recipe for CUDA (du.default_configs("cuda"))
it measures, in this order:

1. training images/s (model only, pre-made pinned batches, device synced), all variants timed in
   alternating rounds so a warming or busy card slows them alike: eager contiguous and eager
   channels_last in the precision du.choose_precision picks (fp32 on TF32 tensor cores from
   compute capability 8.0, else fp16), the card's other precisions for reference, and each
   variant's growth in GPU memory over its set-up and first steps;
2. whether data generation keeps up: du.training_batches alone (in this process, and with the
   config's data_workers) in images/s vs the training rate, and du.Trainer.train end to end
   (its own data pipeline) vs model only;
3. time to --target valid (default 98%): a fresh model trains in chunks of --chunk-seconds; after
   each chunk (clock paused) --samples images drawn with --eval-sampler are scored by
   du.evaluate_samples; it stops at the target (evaluations count against its budget of at most
   3 min, the issue's GPU budget), or with --full-budget trains for the whole budget, evaluation
   time not counted, to report quality there;
4. sampling time for --samples images per sampler:steps (--samplers) with the model from 3;
5. last, as it is slow to build: training images/s with torch.compile (TrainConfig.compile) in
   the default precision, or with --compile-precisions all in each precision (alternating
   rounds); compile time reported apart (--no-compile skips it; it runs only if ~100 s are left).

Prints markdown tables headed by the card's name and the date; saves gpu.json, gpu.md and a
grid of samples in --out.

Without CUDA it exits with status 2, unless --smoke: a tiny model, a few seconds per section,
on whatever device there is (this is how it is checked on a CPU).

Example (on the GPU machine, about 7 minutes; python3 there already has torch, OpenCV, matplotlib):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --total-minutes 7 --out $OUT
Quality after the full 3-minute budget, 1024 samples per evaluation (about 6 minutes):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --total-minutes 6.5 --default-precision-only --no-compile \
        --full-budget --chunk-seconds 60 --samples 1024 --samplers ddpm:1000,ddpm:250,ddpm:100,ddim:50 --out $OUT
Smoke test (CPU, about a minute):
    python benchmarks/gpu.py --smoke --threads 1
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

SMOKE = {"base_channels": 8, "channel_mults": [1, 2], "batch_size": 8}

TRAIN_COLUMNS = [
    ("variant", "training variant", ""),
    ("precision", "precision", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("vs_eager", "vs eager contiguous", ".2f"),
    ("compile_seconds", "compile s", ".1f"),
    ("increase_mb", "memory MiB", ",.0f"),
]
DATA_COLUMNS = [("source", "source", ""), ("images_per_s", "images/s", ",.0f"), ("vs_training", "vs training (eager, model only)", ".2f")]
TTQ_COLUMNS = [
    ("train_seconds", "training s", ".0f"),
    ("steps_trained", "steps", ""),
    ("images_seen", "images seen", ","),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1", ".2f"),
    ("position_w1", "position W1", ".2f"),
    ("loss", "loss (last 50)", ".4f"),
    ("sample_seconds", "eval sampling s", ".1f"),
]
SAMPLING_COLUMNS = [
    ("sampler", "sampler", ""),
    ("steps", "steps", ""),
    ("n", "n", ""),
    ("sample_seconds", "seconds", ".2f"),
    ("images_per_s", "images/s", ",.0f"),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("peak_mb", "peak MiB", ",.0f"),
]


def make_trainer(
    model_config: du.ModelConfig, train_config: du.TrainConfig, device: torch.device, compile_model: bool = False, precision: str | None = None
) -> du.Trainer:
    """A fresh du.Trainer; compile_model sets TrainConfig.compile, precision overrides du.choose_precision's."""
    return du.Trainer(model_config, dataclasses.replace(train_config, compile=compile_model), device=device, precision=precision)


def data_rate(batch_size: int, seed: int, seconds: float, workers: int = 0) -> float:
    """images/s of du.training_batches alone (after its first batch, so worker start-up is excluded)."""
    batches = du.training_batches(batch_size, seed, 0, workers) if workers else du.training_batches(batch_size, seed)
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - start
    del batches
    return count * batch_size / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model and budgets; runs on any device (a CPU check of this script)")
    parser.add_argument("--total-minutes", type=float, default=None, help="wall-clock budget for the whole script, start-up included (default 7; smoke 1)")
    parser.add_argument("--throughput-seconds", type=float, default=None, help="timed seconds per training variant (default 12; smoke 1.5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it only runs on CUDA)")
    parser.add_argument("--default-precision-only", action="store_true", help="skip the rows for the card's other precisions")
    parser.add_argument(
        "--ttq-minutes", type=float, default=None, help="most training minutes for time-to-target (default: what the total budget leaves, at most 4)"
    )
    parser.add_argument("--ttq-compile", action="store_true", help="train the time-to-target model with torch.compile (compile time counts as training time)")
    parser.add_argument("--chunk-seconds", type=float, default=None, help="training seconds between evaluations (default 30; smoke 3)")
    parser.add_argument("--target", type=float, default=0.98, help="valid share to reach (default 0.98)")
    parser.add_argument("--full-budget", action="store_true", help="keep training and evaluating to the end of the time-to-target budget")
    parser.add_argument(
        "--compile-precisions", choices=("default", "all"), default="default", help="torch.compile the default precision only, or each precision"
    )
    parser.add_argument("--samples", type=int, default=None, help="images per evaluation and per sampler (default 256; smoke 8)")
    parser.add_argument(
        "--eval-sampler", type=bc.parse_samplers, default=None, help="sampler:steps for time-to-target evaluations (default ddpm:100; smoke ddpm:10)"
    )
    parser.add_argument(
        "--samplers",
        type=bc.parse_samplers,
        default=None,
        help="sampler:steps list to time (default ddpm:1000,ddpm:100,ddim:50,ddim:20,ddim:10; smoke ddpm:10,ddim:5)",
    )
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    total_minutes = args.total_minutes or (1.0 if args.smoke else 7.0)
    deadline = bc.Deadline(total_minutes * 60 - 10)  # 10 s kept for the report
    reserve = 15 if args.smoke else 150  # seconds the throughput sections leave for time-to-target and sampling

    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu.py measures a CUDA GPU and none is available here; run it on a GPU machine, or add --smoke to check the script on this device", file=sys.stderr
        )
        return 2
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    smoke = args.smoke
    throughput_seconds = args.throughput_seconds or (1.5 if smoke else 12.0)
    chunk_seconds = args.chunk_seconds or (3.0 if smoke else 30.0)
    samples = args.samples or (8 if smoke else 256)
    eval_sampler, eval_steps = (args.eval_sampler or [("ddpm", 10 if smoke else 100)])[0]
    samplers = args.samplers or bc.parse_samplers("ddpm:10,ddim:5" if smoke else "ddpm:1000,ddpm:100,ddim:50,ddim:20,ddim:10")

    device = bc.setup(args)
    if not smoke and device.type != "cuda":
        print(f"gpu.py measures a CUDA GPU, not {device}; add --smoke to check the script on this device", file=sys.stderr)
        return 2
    env = bc.environment(device)
    model_config, train_config = bc.apply_overrides(*du.default_configs("cuda"), args)  # the GPU recipe, on any device
    precision = du.choose_precision(device)
    batch_size = train_config.batch_size
    title = f"# Fast on a GPU: {env['device_name']}, {env['date'][:10]}"
    header = (
        f"{title}\n\n{bc.environment_line(env)}\n\nmodel: {du.describe_model(du.UNet(model_config))}; batch {batch_size}; precision {precision} (du.choose_precision)"
        + (" — SMOKE TEST, not a measurement" if smoke else "")
    )
    print(header, flush=True)
    payload: dict = {
        "benchmark": "gpu",
        "environment": env,
        "args": vars(args),
        "model": model_config,
        "train": train_config,
        "precision": precision,
        "smoke": smoke,
        "skipped": [],
    }
    sections: list[str] = [header]
    out = bc.prepare_out(args.out)

    def save() -> None:
        payload["elapsed_seconds"] = time.monotonic() - started
        bc.save_json(out / "gpu.json", payload)
        bc.save_text(out / "gpu.md", "\n\n".join(sections))

    def skip(what: str) -> None:
        payload["skipped"].append(what)
        print(f"skipped: {what} (time budget)", flush=True)

    # ---------------------------------------------------------------- 1. training throughput (eager)
    pinned = device.type == "cuda"
    batches = [b.pin_memory() if pinned else b for b in itertools.islice(du.training_batches(batch_size, args.seed), 8)]
    memory_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process resident set size"
    train_rows: list[dict] = []

    def time_variants(variants: list[tuple[str, dict]], compile_model: bool = False) -> None:
        """Time training variants (model only) in alternating rounds and add their rows.

        Each variant's memory is the growth over its construction and first three steps (for a
        compiled one, the compile), which also warm it up: the trainers built before it stay
        alive, so an absolute peak would count their weights too. An error becomes a row, not a
        crash.
        """
        trainers: dict[str, tuple[du.Trainer, dict]] = {}
        for name, options in variants:
            config = dataclasses.replace(train_config, channels_last=options.get("channels_last", False))
            try:
                with bc.PeakMemory(device) as memory:
                    trainer = make_trainer(model_config, config, device, compile_model=compile_model, precision=options.get("precision"))
                    _, ready_seconds = bc.timed(lambda trainer=trainer: [trainer.train_step(batches[k]) for k in range(3)], device)
            except Exception as error:  # a failed compile must not cost the rest of the run
                print(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
                train_rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            compile_seconds = ready_seconds if compile_model else math.nan
            trainers[name] = (trainer, {"precision": trainer.precision, "compile_seconds": compile_seconds, **memory.as_dict()})
        if not trainers:
            return
        try:
            results = bc.measure_throughput({name: t.train_step for name, (t, _) in trainers.items()}, batches, device, throughput_seconds, rounds=3)
        except Exception as error:  # e.g. out of memory while timing: record it, keep the rest of the run
            print(f"timing {', '.join(trainers)} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            train_rows.extend({"variant": name, "error": f"{type(error).__name__}: {error}"[:500]} for name in trainers)
            trainers.clear()
            return
        for name, result in results.items():
            row = {"variant": name, **trainers[name][1], **result}
            train_rows.append(row)
            print(f"{name}: {row['images_per_s']:,.0f} images/s, memory growth {row['increase_mb']:,.0f} MiB", flush=True)
        trainers.clear()
        gc.collect()

    def training_section() -> str:
        eager = next((r for r in train_rows if r["variant"] == "eager, contiguous" and "images_per_s" in r), None)
        for row in train_rows:
            row["vs_eager"] = row["images_per_s"] / eager["images_per_s"] if eager and "images_per_s" in row else math.nan
        payload["training"] = train_rows
        return (
            f"## Training throughput (model only, batch {batch_size}, alternating rounds; memory MiB = growth of {memory_kind} over each variant's set-up and first steps)\n\n"
            + bc.markdown_table(train_rows, TRAIN_COLUMNS)
        )

    modern = du.is_ampere_or_newer(device)  # TF32 and native bf16
    labels = {"fp32": "fp32" + (" (TF32 matmuls)" if modern else ""), "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler (a T4's path)"}
    other_precisions = [p for p in du.PRECISIONS if p != precision and (p != "bf16" or modern)] if device.type == "cuda" else []
    variants = [("eager, contiguous", {}), ("eager, channels_last", {"channels_last": True})]
    if not args.default_precision_only:  # the precisions du.choose_precision did not pick, for reference
        variants += [(f"eager, contiguous, {labels[other]}", {"precision": other}) for other in other_precisions]
    while variants and deadline.remaining() < len(variants) * (throughput_seconds + 5) + reserve:
        skip(f"training variant {variants.pop()[0]}")
    time_variants(variants)
    training_index = len(sections)
    sections.append(training_section())
    print("\n" + sections[-1] + "\n", flush=True)
    save()
    eager = next((r for r in train_rows if r["variant"] == "eager, contiguous" and "images_per_s" in r), None)

    # ---------------------------------------------------------------- 2. does data generation keep up?
    data_rows = []
    train_rate = eager["images_per_s"] if eager else math.nan
    workers = getattr(train_config, "data_workers", 0)
    if deadline.remaining() > reserve + 4 * throughput_seconds:
        data_seconds = min(5.0, throughput_seconds)
        data_rows.append({"source": "du.training_batches, 1 process", "images_per_s": data_rate(batch_size, args.seed, data_seconds)})
        if workers:
            try:
                data_rows.append(
                    {"source": f"du.training_batches, {workers} worker processes", "images_per_s": data_rate(batch_size, args.seed, data_seconds, workers)}
                )
            except TypeError:  # an older training_batches without workers
                pass
        trainer = make_trainer(model_config, train_config, device)
        trainer.train(steps=3, progress=False)  # warm-up (and worker start-up) outside the timing
        seen, (_, seconds) = trainer.images_seen, bc.timed(lambda: trainer.train(minutes=throughput_seconds / 60, progress=False), device)
        data_rows.append({"source": f"du.Trainer.train end to end (data_workers={workers})", "images_per_s": (trainer.images_seen - seen) / seconds})
        del trainer
        for row in data_rows:
            row["vs_training"] = row["images_per_s"] / train_rate
        end_to_end = data_rows[-1]["images_per_s"]
        verdict = "keeps up" if end_to_end >= 0.9 * train_rate else "is a bottleneck"
        data_note = f"Data generation {verdict}: end-to-end training runs at {end_to_end / train_rate:.0%} of the model-only rate."
    else:
        skip("data supply")
        data_note = "skipped (time budget)"
    payload["data"] = {"rows": data_rows, "note": data_note}
    sections.append("## Does data generation keep up?\n\n" + (bc.markdown_table(data_rows, DATA_COLUMNS) + "\n\n" if data_rows else "") + data_note)
    print(sections[-1] + "\n", flush=True)
    save()

    # ---------------------------------------------------------------- 3. time to target valid share
    sampling_reserve = 10 if smoke else 60
    budget = deadline.remaining() - sampling_reserve
    if args.ttq_minutes is not None:
        budget = min(budget, args.ttq_minutes * 60)
    elif not smoke:
        budget = min(budget, 180)
    ttq_rows, reached = [], None
    trainer = None
    if budget >= chunk_seconds:
        trainer = make_trainer(model_config, train_config, device, compile_model=args.ttq_compile and device.type == "cuda")
        print(
            f"time to {args.target:.0%} valid: up to {budget:.0f} s of training in {chunk_seconds:.0f} s chunks, {samples} samples with {eval_sampler} {eval_steps} after each",
            flush=True,
        )
        trained, eval_seconds = 0.0, 0.0
        ttq_deadline = bc.Deadline(budget)
        while True:
            # --full-budget: training seconds alone count, so the model trains the whole budget
            left = budget - trained if args.full_budget else ttq_deadline.remaining() - eval_seconds
            chunk = min(chunk_seconds, left)
            if chunk < min(5.0, chunk_seconds) and ttq_rows:
                break
            _, seconds = bc.timed(lambda chunk=chunk: trainer.train(minutes=max(chunk, 1.0) / 60, progress=False), device)
            trained += seconds
            with bc.PeakMemory(device) as memory:
                metrics, images = bc.sample_and_evaluate(trainer.sampling_model, trainer.schedule, samples, eval_sampler, eval_steps, device)
            eval_seconds = metrics["sample_seconds"] + 2
            row = {
                "train_seconds": trained,
                "steps_trained": trainer.step,
                "images_seen": trainer.images_seen,
                "loss": bc.mean_tail(trainer.losses),
                **metrics,
                "eval_peak_mb": memory.peak_mb,
            }
            ttq_rows.append(row)
            print(bc.markdown_table([row], TTQ_COLUMNS).splitlines()[-1], flush=True)
            if metrics["valid"] >= args.target and reached is None:
                reached = row
                if not args.full_budget:
                    break
        bc.save_figure(
            du.plot_grid(images[:32], title=f"{trainer.images_seen:,} images, {trained:.0f} s: valid {100 * ttq_rows[-1]['valid']:.0f}%"),
            out / "gpu_samples.png",
        )
        ttq_note = (
            f"reached {reached['valid']:.1%} valid after **{reached['train_seconds']:.0f} s** of training ({reached['images_seen']:,} images)"
            if reached
            else f"did not reach {args.target:.0%} valid in {trained:.0f} s of training (best {max(r['valid'] for r in ttq_rows):.1%})"
        )
        if args.full_budget:
            last = ttq_rows[-1]
            ttq_note += f"; after the whole budget, {last['train_seconds']:.0f} s: **{last['valid']:.1%} valid**, circle share {last['circle_share']:.2f}"
    else:
        skip("time to target")
        ttq_note = "skipped (time budget)"
    payload["time_to_target"] = {
        "target": args.target,
        "rows": ttq_rows,
        "reached": reached,
        "note": ttq_note,
        "eval_sampler": f"{eval_sampler}:{eval_steps}",
        "compiled": args.ttq_compile,
    }
    sections.append(
        f"## Time to {args.target:.0%} valid ({eval_sampler} {eval_steps} steps, {samples} samples per evaluation; evaluation time excluded)\n\n"
        + (bc.markdown_table(ttq_rows, TTQ_COLUMNS) + "\n\n" if ttq_rows else "")
        + ttq_note
    )
    print("\n" + sections[-1] + "\n", flush=True)
    save()

    # ---------------------------------------------------------------- 4. sampling speed
    sampling_rows = []
    if trainer is not None:
        model = trainer.sampling_model
        du.sample(model, trainer.schedule, min(samples, 16), steps=2, sampler="ddim", progress=False)  # warm-up
        per_step = None
        for sampler, steps in samplers:
            estimate = per_step * steps if per_step else 0.0
            if estimate + 5 > deadline.remaining():
                skip(f"sampling {sampler}:{steps} (estimated {estimate:.0f} s)")
                continue
            with bc.PeakMemory(device) as memory:
                row, _ = bc.sample_and_evaluate(model, trainer.schedule, samples, sampler, steps, device)
            row["peak_mb"] = memory.peak_mb
            per_step = row["sample_seconds"] / steps
            sampling_rows.append(row)
            print(f"{sampler} {steps}: {row['sample_seconds']:.2f} s", flush=True)
    else:
        skip("sampling speed (no trained model)")
    payload["sampling"] = sampling_rows
    trained_note = f"model from the time-to-target run ({trainer.images_seen:,} images)" if trainer is not None else ""
    sections.append(f"## Sampling {samples} images ({trained_note})\n\n" + bc.markdown_table(sampling_rows, SAMPLING_COLUMNS))
    print(sections[-1] + "\n", flush=True)
    trainer = model = None  # free its weights, EMA and optimiser state: they would count in the compiled variant's peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- 5. torch.compile (last: slow to build)
    if not args.no_compile and device.type == "cuda":
        compiled = [precision] + (other_precisions if args.compile_precisions == "all" else [])
        if deadline.remaining() >= len(compiled) * (throughput_seconds + 90):
            names = [f"torch.compile, contiguous, {labels[p]}" if p != precision else "torch.compile, contiguous" for p in compiled]
            time_variants([(name, {"precision": p}) for name, p in zip(names, compiled)], compile_model=True)
            sections[training_index] = training_section()
            print("\n" + sections[training_index] + "\n", flush=True)
        else:
            skip("torch.compile variant")

    # every PeakMemory block resets the peak counter, so the overall peak is the largest block peak
    peaks = [r.get("peak_mb") for r in train_rows + sampling_rows] + [r.get("eval_peak_mb") for r in ttq_rows]
    payload["peak_memory_mb_overall"] = max((p for p in peaks if p is not None and math.isfinite(p)), default=math.nan)
    sections.append(f"total wall time {time.monotonic() - started:.0f} s; skipped: {', '.join(payload['skipped']) or 'nothing'}")
    save()
    print(sections[-1])
    print(f"saved {out / 'gpu.json'}, gpu.md and gpu_samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
