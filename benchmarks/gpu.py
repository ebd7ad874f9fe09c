"""Fast on a GPU: training speed, data supply, sampling speed, memory and time to 98% valid shapes.

One invocation does everything, within --total-minutes of wall time
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
   3 min, du.default_training_minutes on a modern card), or with --full-budget trains for the
   whole budget, evaluation time not counted, to report quality there;
4. sampling time for --samples images per sampler:steps (--samplers) with the model from 3;
5. last, as it is slow to build: training images/s with torch.compile (TrainConfig.compile) in
   the default precision, or with --compile-precisions all in each precision (alternating
   rounds); compile time reported apart (--no-compile skips it; it runs only if ~100 s are left).

Prints markdown tables headed by the card's name and the date; saves gpu.json, gpu.md and a
grid of samples in --out. main() runs the sections as named phases (parse_args, start_run,
training_throughput, data_supply, time_to_target, sampling_speed, compiled_throughput, finish);
they share one GpuRun that holds the settings, the payload and the report's sections.

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

import argparse
import dataclasses
import gc
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
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
DATA_COLUMNS = [
    ("source", "source", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("vs_training", "vs training (eager, model only)", ".2f"),
]
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
EAGER = "eager, contiguous"


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def make_trainer(
    model_config: du.ModelConfig,
    train_config: du.TrainConfig,
    device: torch.device,
    compile_model: bool = False,
    precision: str | None = None,
) -> du.Trainer:
    """A fresh du.Trainer; compile_model sets TrainConfig.compile, precision overrides du.choose_precision's."""
    config = dataclasses.replace(train_config, compile=compile_model)
    return du.Trainer(model_config, config, device=device, precision=precision)


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


def step_of(trainer: du.Trainer):
    """One training step on an (images, condition) batch; the condition reaches only a conditional model."""
    return lambda batch: trainer.train_step(*batch)


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


@dataclass
class GpuRun:
    """What every phase shares: the settings, the configurations, the clock, the payload and the report."""

    args: argparse.Namespace
    device: torch.device
    env: dict
    model_config: du.ModelConfig
    train_config: du.TrainConfig
    precision: str
    smoke: bool
    throughput_seconds: float
    chunk_seconds: float
    samples: int
    eval_sampler: str
    eval_steps: int
    samplers: list[tuple[str, int]]
    started: float
    deadline: bc.Deadline
    reserve: float  # seconds the throughput sections leave for time-to-target and sampling
    out: Path
    payload: dict = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    batches: list = field(default_factory=list)
    train_rows: list[dict] = field(default_factory=list)
    ttq_rows: list[dict] = field(default_factory=list)
    sampling_rows: list[dict] = field(default_factory=list)
    training_index: int = -1  # where the training table sits in sections (it is rewritten after compiling)

    @property
    def batch_size(self) -> int:
        return self.train_config.batch_size

    @property
    def modern(self) -> bool:
        """TF32 and native bf16."""
        return du.is_ampere_or_newer(self.device)

    @property
    def labels(self) -> dict[str, str]:
        return {
            "fp32": "fp32" + (" (TF32 matmuls)" if self.modern else ""),
            "bf16": "bf16 autocast",
            "fp16": "fp16 autocast + GradScaler (a T4's path)",
        }

    @property
    def other_precisions(self) -> list[str]:
        """The precisions du.choose_precision did not pick that this card can run."""
        if self.device.type != "cuda":
            return []
        return [p for p in du.PRECISIONS if p != self.precision and (p != "bf16" or self.modern)]

    def eager_row(self) -> dict | None:
        return next((r for r in self.train_rows if r["variant"] == EAGER and "images_per_s" in r), None)

    def add_section(self, text: str, blank_before: bool = False) -> None:
        self.sections.append(text)
        print(("\n" if blank_before else "") + text + "\n", flush=True)

    def save(self) -> None:
        self.payload["elapsed_seconds"] = time.monotonic() - self.started
        bc.save_json(self.out / "gpu.json", self.payload)
        bc.save_text(self.out / "gpu.md", "\n\n".join(self.sections))

    def skip(self, what: str) -> None:
        self.payload["skipped"].append(what)
        print(f"skipped: {what} (time budget)", flush=True)


# ------------------------------------------------------------------------------------------
# Phases, in the order main() runs them
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, "runs/benchmarks/gpu")
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny model and budgets; runs on any device (a CPU check of this script)")
    add(
        "--total-minutes",
        type=float,
        default=None,
        help="wall-clock budget for the whole script, start-up included (default 7; smoke 1)",
    )
    add(
        "--throughput-seconds",
        type=float,
        default=None,
        help="timed seconds per training variant (default 12; smoke 1.5)",
    )
    add("--no-compile", action="store_true", help="skip the torch.compile variant (it only runs on CUDA)")
    add("--default-precision-only", action="store_true", help="skip the rows for the card's other precisions")
    add(
        "--ttq-minutes",
        type=float,
        default=None,
        help="most training minutes for time-to-target (default: what the total budget leaves, at most 4)",
    )
    add(
        "--ttq-compile",
        action="store_true",
        help="train the time-to-target model with torch.compile (compile time counts as training time)",
    )
    add("--chunk-seconds", type=float, default=None, help="training seconds between evaluations (default 30; smoke 3)")
    add("--target", type=float, default=0.98, help="valid share to reach (default 0.98)")
    add(
        "--full-budget",
        action="store_true",
        help="keep training and evaluating to the end of the time-to-target budget",
    )
    add(
        "--compile-precisions",
        choices=("default", "all"),
        default="default",
        help="torch.compile the default precision only, or each precision",
    )
    add("--samples", type=int, default=None, help="images per evaluation and per sampler (default 256; smoke 8)")
    add(
        "--eval-sampler",
        type=bc.parse_samplers,
        default=None,
        help="sampler:steps for time-to-target evaluations (default ddpm:100; smoke ddpm:10)",
    )
    add(
        "--samplers",
        type=bc.parse_samplers,
        default=None,
        help="sampler:steps list to time (default ddpm:1000,ddpm:100,ddim:50,ddim:20,ddim:10; smoke ddpm:10,ddim:5)",
    )
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def start_run(args: argparse.Namespace) -> GpuRun | None:
    """The settings (smoke defaults filled in), the device and the report's header; None where there is no GPU."""
    started = time.monotonic()
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu.py measures a CUDA GPU and none is available here; run it on a GPU machine, "
            "or add --smoke to check the script on this device",
            file=sys.stderr,
        )
        return None
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    smoke = args.smoke
    device = bc.setup(args)
    if not smoke and device.type != "cuda":
        print(
            f"gpu.py measures a CUDA GPU, not {device}; add --smoke to check the script on this device", file=sys.stderr
        )
        return None
    model_config, train_config = bc.apply_overrides(*du.default_configs("cuda"), args)  # the GPU recipe, on any device
    eval_sampler, eval_steps = (args.eval_sampler or [("ddpm", 10 if smoke else 100)])[0]
    default_samplers = "ddpm:10,ddim:5" if smoke else "ddpm:1000,ddpm:100,ddim:50,ddim:20,ddim:10"
    run = GpuRun(
        args=args,
        device=device,
        env=bc.environment(device),
        model_config=model_config,
        train_config=train_config,
        precision=du.choose_precision(device),
        smoke=smoke,
        throughput_seconds=args.throughput_seconds or (1.5 if smoke else 12.0),
        chunk_seconds=args.chunk_seconds or (3.0 if smoke else 30.0),
        samples=args.samples or (8 if smoke else 256),
        eval_sampler=eval_sampler,
        eval_steps=eval_steps,
        samplers=args.samplers or bc.parse_samplers(default_samplers),
        started=started,
        deadline=bc.Deadline((args.total_minutes or (1.0 if smoke else 7.0)) * 60 - 10),  # 10 s kept for the report
        reserve=15 if smoke else 150,
        out=bc.prepare_out(args.out),
    )
    header = report_header(run)
    print(header, flush=True)
    run.sections.append(header)
    run.payload = {
        "benchmark": "gpu",
        "environment": run.env,
        "args": vars(args),
        "model": model_config,
        "train": train_config,
        "precision": run.precision,
        "smoke": smoke,
        "skipped": [],
    }
    return run


def report_header(run: GpuRun) -> str:
    title = f"# Fast on a GPU: {run.env['device_name']}, {run.env['date'][:10]}"
    model = du.describe_model(du.UNet(run.model_config))
    smoke = " — SMOKE TEST, not a measurement" if run.smoke else ""
    setting = f"model: {model}; batch {run.batch_size}; precision {run.precision} (du.choose_precision){smoke}"
    return f"{title}\n\n{bc.environment_line(run.env)}\n\n{setting}"


def training_throughput(run: GpuRun) -> None:
    """1. Training images/s, model only: eager layouts in the default precision, then the other precisions."""
    pinned = run.device.type == "cuda"
    run.batches = [
        (images.pin_memory(), condition.pin_memory()) if pinned else (images, condition)
        for images, condition in itertools.islice(du.training_batches(run.batch_size, run.args.seed), 8)
    ]
    variants = [(EAGER, {}), ("eager, channels_last", {"channels_last": True})]
    if not run.args.default_precision_only:  # the precisions du.choose_precision did not pick, for reference
        variants += [(f"{EAGER}, {run.labels[other]}", {"precision": other}) for other in run.other_precisions]
    while variants and run.deadline.remaining() < len(variants) * (run.throughput_seconds + 5) + run.reserve:
        run.skip(f"training variant {variants.pop()[0]}")
    time_variants(run, variants)
    run.training_index = len(run.sections)
    run.add_section(training_section(run), blank_before=True)
    run.save()


def time_variants(run: GpuRun, variants: list[tuple[str, dict]], compile_model: bool = False) -> None:
    """Time training variants (model only) in alternating rounds and add their rows.

    Each variant's memory is the growth over its construction and first three steps (for a compiled one, the
    compile), which also warm it up: the trainers built before it stay alive, so an absolute peak would count
    their weights too. An error becomes a row, not a crash.
    """
    trainers: dict[str, tuple[du.Trainer, dict]] = {}
    for name, options in variants:
        built = build_variant(run, name, options, compile_model)
        if built is not None:
            trainers[name] = built
    if not trainers:
        return
    steps = {name: step_of(trainer) for name, (trainer, _) in trainers.items()}
    try:
        results = bc.measure_throughput(steps, run.batches, run.device, run.throughput_seconds, rounds=3)
    except Exception as error:  # e.g. out of memory while timing: record it, keep the rest of the run
        print(f"timing {', '.join(trainers)} failed: {first_line(error)}", flush=True)
        run.train_rows.extend({"variant": name, "error": error_text(error)} for name in trainers)
        return
    for name, result in results.items():
        row = {"variant": name, **trainers[name][1], **result}
        run.train_rows.append(row)
        print(f"{name}: {row['images_per_s']:,.0f} images/s, memory growth {row['increase_mb']:,.0f} MiB", flush=True)
    trainers.clear()
    gc.collect()


def build_variant(run: GpuRun, name: str, options: dict, compile_model: bool) -> tuple[du.Trainer, dict] | None:
    """A warmed-up trainer for one variant and its set-up figures, or None (and an error row) when it fails."""
    config = dataclasses.replace(run.train_config, channels_last=options.get("channels_last", False))
    try:
        with bc.PeakMemory(run.device) as memory:
            trainer = make_trainer(
                run.model_config, config, run.device, compile_model=compile_model, precision=options.get("precision")
            )
            _, ready_seconds = bc.timed(lambda: [trainer.train_step(*run.batches[k]) for k in range(3)], run.device)
    except Exception as error:  # a failed compile must not cost the rest of the run
        print(f"{name} failed: {first_line(error)}", flush=True)
        run.train_rows.append({"variant": name, "error": error_text(error)})
        return None
    compile_seconds = ready_seconds if compile_model else math.nan
    return trainer, {"precision": trainer.precision, "compile_seconds": compile_seconds, **memory.as_dict()}


def training_section(run: GpuRun) -> str:
    eager = run.eager_row()
    for row in run.train_rows:
        row["vs_eager"] = row["images_per_s"] / eager["images_per_s"] if eager and "images_per_s" in row else math.nan
    run.payload["training"] = run.train_rows
    memory_kind = "torch.cuda.max_memory_allocated" if run.device.type == "cuda" else "process resident set size"
    heading = (
        f"## Training throughput (model only, batch {run.batch_size}, alternating rounds; memory MiB = growth of "
        f"{memory_kind} over each variant's set-up and first steps)"
    )
    return f"{heading}\n\n{bc.markdown_table(run.train_rows, TRAIN_COLUMNS)}"


def data_supply(run: GpuRun) -> None:
    """2. Does data generation keep up with training? The data alone, then Trainer.train end to end."""
    eager = run.eager_row()
    train_rate = eager["images_per_s"] if eager else math.nan
    data_rows: list[dict] = []
    if run.deadline.remaining() > run.reserve + 4 * run.throughput_seconds:
        data_rows = measure_data_rates(run)
        for row in data_rows:
            row["vs_training"] = row["images_per_s"] / train_rate
        end_to_end = data_rows[-1]["images_per_s"]
        verdict = "keeps up" if end_to_end >= 0.9 * train_rate else "is a bottleneck"
        share = f"{end_to_end / train_rate:.0%}"
        data_note = f"Data generation {verdict}: end-to-end training runs at {share} of the model-only rate."
    else:
        run.skip("data supply")
        data_note = "skipped (time budget)"
    run.payload["data"] = {"rows": data_rows, "note": data_note}
    table = bc.markdown_table(data_rows, DATA_COLUMNS) + "\n\n" if data_rows else ""
    run.add_section(f"## Does data generation keep up?\n\n{table}{data_note}")
    run.save()


def measure_data_rates(run: GpuRun) -> list[dict]:
    seed, seconds = run.args.seed, min(5.0, run.throughput_seconds)
    workers = run.train_config.data_workers
    rows = [{"source": "du.training_batches, 1 process", "images_per_s": data_rate(run.batch_size, seed, seconds)}]
    if workers:
        rate = data_rate(run.batch_size, seed, seconds, workers)
        rows.append({"source": f"du.training_batches, {workers} worker processes", "images_per_s": rate})
    trainer = make_trainer(run.model_config, run.train_config, run.device)
    trainer.train(steps=3, progress=False)  # warm-up (and worker start-up) outside the timing
    seen = trainer.images_seen
    _, seconds = bc.timed(lambda: trainer.train(minutes=run.throughput_seconds / 60, progress=False), run.device)
    end_to_end = (trainer.images_seen - seen) / seconds
    rows.append({"source": f"du.Trainer.train end to end (data_workers={workers})", "images_per_s": end_to_end})
    return rows


def time_to_target(run: GpuRun) -> du.Trainer | None:
    """3. Train a fresh model in chunks, scoring it after each (clock paused), until --target valid or the budget."""
    args = run.args
    budget = run.deadline.remaining() - (10 if run.smoke else 60)  # seconds kept for sampling
    if args.ttq_minutes is not None:
        budget = min(budget, args.ttq_minutes * 60)
    elif not run.smoke:
        budget = min(budget, 180)
    trainer, reached, note = None, None, "skipped (time budget)"
    if budget >= run.chunk_seconds:
        compiled = args.ttq_compile and run.device.type == "cuda"
        trainer = make_trainer(run.model_config, run.train_config, run.device, compile_model=compiled)
        print(
            f"time to {args.target:.0%} valid: up to {budget:.0f} s of training in {run.chunk_seconds:.0f} s chunks, "
            f"{run.samples} samples with {run.eval_sampler} {run.eval_steps} after each",
            flush=True,
        )
        reached, trained = train_until_target(run, trainer, budget)
        note = target_note(run, reached, trained)
    else:
        run.skip("time to target")
    run.payload["time_to_target"] = {
        "target": args.target,
        "rows": run.ttq_rows,
        "reached": reached,
        "note": note,
        "eval_sampler": f"{run.eval_sampler}:{run.eval_steps}",
        "compiled": args.ttq_compile,
    }
    heading = (
        f"## Time to {args.target:.0%} valid ({run.eval_sampler} {run.eval_steps} steps, {run.samples} samples per "
        "evaluation; evaluation time excluded)"
    )
    table = bc.markdown_table(run.ttq_rows, TTQ_COLUMNS) + "\n\n" if run.ttq_rows else ""
    run.add_section(f"{heading}\n\n{table}{note}", blank_before=True)
    run.save()
    return trainer


def train_until_target(run: GpuRun, trainer: du.Trainer, budget: float) -> tuple[dict | None, float]:
    """(the first row at the target or None, seconds trained); saves a grid of the last evaluation's samples."""
    trained, eval_seconds, reached = 0.0, 0.0, None
    ttq_deadline = bc.Deadline(budget)
    while True:
        # --full-budget: training seconds alone count, so the model trains the whole budget
        left = budget - trained if run.args.full_budget else ttq_deadline.remaining() - eval_seconds
        chunk = min(run.chunk_seconds, left)
        if chunk < min(5.0, run.chunk_seconds) and run.ttq_rows:
            break
        _, seconds = bc.timed(
            lambda chunk=chunk: trainer.train(minutes=max(chunk, 1.0) / 60, progress=False), run.device
        )
        trained += seconds
        row, images = evaluate_chunk(run, trainer, trained)
        eval_seconds = row["sample_seconds"] + 2
        if row["valid"] >= run.args.target and reached is None:
            reached = row
            if not run.args.full_budget:
                break
    title = f"{trainer.images_seen:,} images, {trained:.0f} s: valid {100 * run.ttq_rows[-1]['valid']:.0f}%"
    bc.save_figure(du.plot_grid(images[:32], title=title), run.out / "gpu_samples.png")
    return reached, trained


def evaluate_chunk(run: GpuRun, trainer: du.Trainer, trained: float) -> tuple[dict, torch.Tensor]:
    with bc.PeakMemory(run.device) as memory:
        metrics, images = bc.sample_and_evaluate(
            trainer.sampling_model, trainer.schedule, run.samples, run.eval_sampler, run.eval_steps, run.device
        )
    row = {
        "train_seconds": trained,
        "steps_trained": trainer.step,
        "images_seen": trainer.images_seen,
        "loss": bc.mean_tail(trainer.losses),
        **metrics,
        "eval_peak_mb": memory.peak_mb,
    }
    run.ttq_rows.append(row)
    print(bc.markdown_table([row], TTQ_COLUMNS).splitlines()[-1], flush=True)
    return row, images


def target_note(run: GpuRun, reached: dict | None, trained: float) -> str:
    target = run.args.target
    if reached:
        note = (
            f"reached {reached['valid']:.1%} valid after **{reached['train_seconds']:.0f} s** of training "
            f"({reached['images_seen']:,} images)"
        )
    else:
        best = max(r["valid"] for r in run.ttq_rows)
        note = f"did not reach {target:.0%} valid in {trained:.0f} s of training (best {best:.1%})"
    if run.args.full_budget:
        last = run.ttq_rows[-1]
        note += (
            f"; after the whole budget, {last['train_seconds']:.0f} s: **{last['valid']:.1%} valid**, "
            f"circle share {last['circle_share']:.2f}"
        )
    return note


def sampling_speed(run: GpuRun, trainer: du.Trainer | None) -> None:
    """4. Sampling time and quality per sampler:steps, with the time-to-target model."""
    if trainer is not None:
        model = trainer.sampling_model
        du.sample(model, trainer.schedule, min(run.samples, 16), steps=2, sampler="ddim", progress=False)  # warm-up
        per_step = None
        for sampler, steps in run.samplers:
            estimate = per_step * steps if per_step else 0.0
            if estimate + 5 > run.deadline.remaining():
                run.skip(f"sampling {sampler}:{steps} (estimated {estimate:.0f} s)")
                continue
            with bc.PeakMemory(run.device) as memory:
                row, _ = bc.sample_and_evaluate(model, trainer.schedule, run.samples, sampler, steps, run.device)
            row["peak_mb"] = memory.peak_mb
            per_step = row["sample_seconds"] / steps
            run.sampling_rows.append(row)
            print(f"{sampler} {steps}: {row['sample_seconds']:.2f} s", flush=True)
    else:
        run.skip("sampling speed (no trained model)")
    run.payload["sampling"] = run.sampling_rows
    trained_note = f"model from the time-to-target run ({trainer.images_seen:,} images)" if trainer is not None else ""
    table = bc.markdown_table(run.sampling_rows, SAMPLING_COLUMNS)
    run.add_section(f"## Sampling {run.samples} images ({trained_note})\n\n{table}")


def free_device_memory(device: torch.device) -> None:
    """Release freed weights, so they do not count in the compiled variant's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled_throughput(run: GpuRun) -> None:
    """5. torch.compile variants (last: slow to build); their rows join the training table."""
    if run.args.no_compile or run.device.type != "cuda":
        return
    compiled = [run.precision] + (run.other_precisions if run.args.compile_precisions == "all" else [])
    if run.deadline.remaining() < len(compiled) * (run.throughput_seconds + 90):
        run.skip("torch.compile variant")
        return
    names = [
        f"torch.compile, contiguous, {run.labels[p]}" if p != run.precision else "torch.compile, contiguous"
        for p in compiled
    ]
    time_variants(run, [(name, {"precision": p}) for name, p in zip(names, compiled)], compile_model=True)
    run.sections[run.training_index] = training_section(run)
    print("\n" + run.sections[run.training_index] + "\n", flush=True)


def finish(run: GpuRun) -> None:
    """The overall memory peak, the wall time and what was skipped; the final save."""
    # every PeakMemory block resets the peak counter, so the overall peak is the largest block peak
    peaks = [r.get("peak_mb") for r in run.train_rows + run.sampling_rows] + [
        r.get("eval_peak_mb") for r in run.ttq_rows
    ]
    finite = [p for p in peaks if p is not None and math.isfinite(p)]
    run.payload["peak_memory_mb_overall"] = max(finite, default=math.nan)
    skipped = ", ".join(run.payload["skipped"]) or "nothing"
    run.sections.append(f"total wall time {time.monotonic() - run.started:.0f} s; skipped: {skipped}")
    run.save()
    print(run.sections[-1])
    print(f"saved {run.out / 'gpu.json'}, gpu.md and gpu_samples.png")


def main(argv: list[str] | None = None) -> int:
    run = start_run(parse_args(argv))
    if run is None:
        return 2
    training_throughput(run)
    data_supply(run)
    trainer = time_to_target(run)
    sampling_speed(run, trainer)
    trainer = None  # its weights, EMA and optimiser state would count in the compiled variant's peak
    free_device_memory(run.device)
    compiled_throughput(run)
    finish(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
