"""Shared plumbing for the benchmark scripts (not a benchmark itself).

Importing this module puts the repository root on sys.path, so every script can then
`import diffusion_utils as du`. It holds only measuring and reporting helpers: argument parsers,
a checkpoint or a tiny smoke-test model to measure, timing with a device sync, markdown tables,
JSON that stays valid with NaNs, a script's report and outputs, line plots, memory peaks, a
matrix-multiply rate and FLOP counts. All diffusion logic stays in diffusion_utils.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

# ------------------------------------------------------------------------------------------
# Command-line helpers
# ------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """ "10,5,10" -> [5, 10]: integers >= 1, sorted, without repeats."""
    values = parse_ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return sorted(set(values))


def parse_floats(text: str) -> list[float]:
    """ "3,6,9" -> [3.0, 6.0, 9.0]."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}")
    return values


def parse_ints(text: str) -> list[int]:
    """ "1,2,2" -> [1, 2, 2]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """ "ddpm:1000,ddim:50,dpm++:20" -> [("ddpm", 1000), ("ddim", 50), ("dpm++", 20)]; names from du.SAMPLERS."""
    result = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, _, steps = item.strip().partition(":")
        if name not in du.SAMPLERS or not steps.isdigit() or int(steps) < 1:
            names = ", ".join(du.SAMPLERS)
            raise argparse.ArgumentTypeError(
                f"sampler entries look like ddpm:100 or ddim:50 (samplers: {names}), got {item!r}"
            )
        result.append((name, int(steps)))
    if not result:
        raise argparse.ArgumentTypeError("give at least one sampler:steps entry")
    return result


def parse_gamma(text: str) -> float | str:
    """ "5" -> 5.0; "none" -> "none" (plain MSE; kept as a string so that None means "not given")."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or none, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or none, got {text!r}")
    return value


def make_parser(doc: str, out_default: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as description, the rest (examples) as
    epilog, plus the flags every script shares (add_common_args)."""
    summary, _, details = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=details
    )
    add_common_args(parser, out_default)
    return parser


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """--out, --device and --seed, the same in every script."""
    parser.add_argument(
        "--out", default=out_default, help=f"folder for JSON, markdown and plots (default {out_default})"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: du.pick_device(), the fastest available)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (sampling uses its own fixed seed)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 helps on a CPU shared with other work)",
    )


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the device of --device (or the fastest available)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return du.pick_device(args.device)


def add_model_override_args(parser: argparse.ArgumentParser) -> None:
    """Flags that change every configuration a script builds: smaller models for smoke tests on
    a CPU, or one setting for an experiment. (vs_diffusers.py's "diffusers-best" keeps its own
    --best-lr.)"""
    group = parser.add_argument_group(
        "model and training overrides (applied to every configuration; for smoke tests and experiments)"
    )
    group.add_argument("--base-channels", type=int, help="override ModelConfig.base_channels")
    group.add_argument("--channel-mults", type=parse_ints, help="override ModelConfig.channel_mults, e.g. 1,2")
    group.add_argument("--blocks-per-level", type=int, help="override ModelConfig.blocks_per_level")
    group.add_argument("--batch-size", type=int, help="override TrainConfig.batch_size")
    group.add_argument("--lr", type=float, help="override TrainConfig.lr")
    group.add_argument(
        "--min-snr-gamma", type=parse_gamma, help="override TrainConfig.min_snr_gamma: a number, or none for plain MSE"
    )
    group.add_argument(
        "--min-snr-form", choices=du.MIN_SNR_FORMS, help="override TrainConfig.min_snr_form: cap or paper"
    )
    group.add_argument(
        "--lr-schedule", choices=du.LR_SCHEDULES, help="override TrainConfig.lr_schedule: constant, or cosine to 0"
    )
    group.add_argument(
        "--conditional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override ModelConfig.conditional (--no-conditional: unconditional)",
    )


def apply_overrides(
    model: du.ModelConfig, train: du.TrainConfig, args: argparse.Namespace
) -> tuple[du.ModelConfig, du.TrainConfig]:
    """The configurations with the command line's overrides (and seed) applied."""
    model_changes = {
        key: value
        for key, value in (
            ("base_channels", getattr(args, "base_channels", None)),
            ("channel_mults", tuple(args.channel_mults) if getattr(args, "channel_mults", None) else None),
            ("blocks_per_level", getattr(args, "blocks_per_level", None)),
            ("conditional", getattr(args, "conditional", None)),
        )
        if value is not None
    }
    train_changes: dict[str, Any] = {"seed": getattr(args, "seed", train.seed)}
    for key in ("batch_size", "lr", "min_snr_form", "lr_schedule"):
        if getattr(args, key, None) is not None:
            train_changes[key] = getattr(args, key)
    gamma = getattr(args, "min_snr_gamma", None)
    if gamma is not None:
        train_changes["min_snr_gamma"] = None if gamma == "none" else gamma
    return dataclasses.replace(model, **model_changes), dataclasses.replace(train, **train_changes)


def prepare_out(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------------
# Scripts that measure one trained model (samplers.py, guidance.py): its source and their outputs
# ------------------------------------------------------------------------------------------


def add_model_source_args(parser: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """--checkpoint or (smoke tests) --train-steps, one of them required: what load_or_train reads."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=checkpoint_help)
    source.add_argument("--train-steps", type=positive_int, help="smoke tests: train a tiny model this many steps")


def load_or_train(args: argparse.Namespace, device) -> tuple[du.UNet, du.NoiseSchedule, str]:
    """The checkpoint's sampling model, or (smoke tests) a tiny conditional model trained here."""
    if args.checkpoint:
        model, schedule = du.load_model(args.checkpoint, device=device)
        return model, schedule, f"checkpoint {args.checkpoint}"
    model_config = du.ModelConfig(base_channels=8, channel_mults=(1, 2), conditional=True)
    train_config = du.TrainConfig(batch_size=8, channels_last=False, seed=args.seed)
    trainer = du.Trainer(model_config, train_config, device=device)
    trainer.train(steps=args.train_steps, progress=False)
    return trainer.sampling_model.eval(), trainer.schedule, f"tiny model trained here for {trainer.step} steps (smoke)"


def command_line(script: str | os.PathLike, argv: list[str] | None) -> str:
    """The command that runs `script` (a benchmark's __file__) from the repository root with argv (None: this
    process's arguments)."""
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", Path(script).resolve().relative_to(ROOT).as_posix(), *arguments])


@dataclasses.dataclass
class RunOutputs:
    """A benchmark's outputs, <out>/<name>.json, <out>/<name>.md and its pictures, and what each starts with.

    run: the environment (its date first), the command and the arguments; the script adds its model and source.
    """

    name: str
    title: str
    out: Path
    run: dict[str, Any]

    @classmethod
    def start(
        cls, name: str, title: str, args: argparse.Namespace, device, script: str, argv: list[str] | None
    ) -> RunOutputs:
        """The --out folder made, and the run described; prints the title and the environment line."""
        run = {"environment": environment(device), "command": command_line(script, argv), "args": vars(args)}
        outputs = cls(name, title, prepare_out(args.out), run)
        print(f"# {title}\n{environment_line(run['environment'])}", flush=True)
        return outputs

    def save_json(self, **results: Any) -> Path:
        """<out>/<name>.json: the benchmark's name, the run, then the results (rewritten as they grow)."""
        return save_json(self.out / f"{self.name}.json", {"benchmark": self.name, **self.run, **results})

    def report(self, table: str, notes: list[str]) -> str:
        """The markdown report: title, environment line (with the date), command, model, table, notes."""
        run = self.run
        lines = [f"# {self.title}", environment_line(run["environment"]), f"command: `{run['command']}`"]
        return "\n\n".join([*lines, f"model: {run['source']}", table, *notes]) + "\n"

    def write(self, table: str, notes: list[str], figures: dict[str, Any], **results: Any) -> None:
        """Print the report; write it, the JSON (the run and the results) and the figures ({file name: figure})."""
        text = self.report(table, notes)
        print("\n" + text)
        save_text(self.out / f"{self.name}.md", text)
        self.save_json(**results)
        saved = [save_figure(figure, self.out / file).name for file, figure in figures.items()]
        print(f"saved {self.out / f'{self.name}.json'}, " + ", ".join([f"{self.name}.md", *saved]))


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """(fn(), seconds), with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class Deadline:
    """A wall-clock budget: remaining() seconds, expired()."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0


def measure_throughput(
    steps: dict[str, Callable[[Any], Any]],
    batches: list,
    device: torch.device,
    seconds: float,
    rounds: int = 3,
    warmup: int = 2,
) -> dict[str, dict]:
    """images/s of each step function (called with one batch), timed in alternating rounds.

    A batch is an images tensor or an (images, condition) pair as du.training_batches yields. Rounds interleave
    the candidates, so a busy machine slows them alike. On CUDA the device is synced every 5 steps and at the end
    of each round, so queued work is counted.
    """
    batch_size = len(batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0])
    totals = {name: [0, 0.0] for name in steps}
    for step in steps.values():
        for k in range(warmup):
            step(batches[k % len(batches)])
    synchronize(device)
    for _ in range(rounds):
        for name, step in steps.items():
            count, start = 0, time.perf_counter()
            while True:
                step(batches[count % len(batches)])
                count += 1
                if count % 5 == 0 or device.type != "cuda":
                    synchronize(device)
                    if time.perf_counter() - start >= seconds / rounds:
                        break
            synchronize(device)
            totals[name][0] += count
            totals[name][1] += time.perf_counter() - start
    return {name: {"steps": n, "seconds": s, "images_per_s": n * batch_size / s} for name, (n, s) in totals.items()}


# ------------------------------------------------------------------------------------------
# Sampling + evaluation in one timed call
# ------------------------------------------------------------------------------------------


def sample_and_evaluate(
    model: torch.nn.Module,
    schedule: du.NoiseSchedule,
    n: int,
    sampler: str,
    steps: int,
    device: torch.device,
    seed: int = 1234,
    batch_size: int = 256,
    progress: bool = False,
    condition: du.Condition | None = None,
    guidance: float = du.DEFAULT_GUIDANCE,
    spacing: str | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Draw n images with du.sample, time it (`device` synced), and score them with du.evaluate_samples.

    du.sample runs on the model's device; `device` only says what to synchronise. condition: n requests for a
    conditional model (None: unconditional samples, the null condition). Returns (a flat dict of metrics plus
    sampler, steps, seconds and images/s, the images).
    """

    def draw() -> du.SampleResult:
        return du.sample(
            model,
            schedule,
            n,
            steps=steps,
            sampler=sampler,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            condition=condition,
            guidance=guidance,
            spacing=spacing,
        )

    result, seconds = timed(draw, device)
    metrics = du.evaluate_samples(result.images)
    return {
        "sampler": sampler,
        "steps": steps,
        "sample_seconds": seconds,
        "images_per_s": n / seconds,
        **metrics,
    }, result.images


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss_mb() -> float:
    """The process's lifetime peak resident memory (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """Peak memory over a `with` block.

    CUDA: torch.cuda.max_memory_allocated after a reset (exact, tensors only).
    CPU: the resident set size polled every few milliseconds from /proc/self/statm by a thread
    (Linux); `increase_mb` is the peak minus the RSS at entry. Where /proc is missing it falls back
    to getrusage's lifetime peak, which can only show growth beyond earlier peaks.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.start_mb = math.nan
        self.peak_mb = math.nan
        self.kind = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "torch.cuda.max_memory_allocated"
            return self
        rss = _current_rss_bytes()
        if rss is None:
            self.start_mb = max_rss_mb()
            self.kind = "getrusage ru_maxrss (lifetime peak)"
            return self
        self.kind = "resident set size, polled"
        self.start_mb = rss / 2**20
        self._peak = rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = _current_rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _current_rss_bytes()
            self.peak_mb = max(self._peak, rss or 0) / 2**20
        else:
            self.peak_mb = max_rss_mb()

    def as_dict(self) -> dict[str, Any]:
        return {
            "memory_measure": self.kind,
            "start_mb": self.start_mb,
            "peak_mb": self.peak_mb,
            "increase_mb": self.increase_mb,
        }


# ------------------------------------------------------------------------------------------
# Hardware efficiency: FLOPs and a reference matrix-multiply rate
# ------------------------------------------------------------------------------------------


def matmul_flops_per_second(
    device: torch.device | str, dtype: torch.dtype = torch.float32, size: int | None = None, min_seconds: float = 1.0
) -> float:
    """Measured rate of a large square torch.mm on this device (2 n^3 FLOPs per product)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):  # warm-up
        torch.mm(a, b)
    count, elapsed = 0, 0.0
    synchronize(device)
    start = time.perf_counter()
    while elapsed < min_seconds or count < 3:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            synchronize(device)
            elapsed = time.perf_counter() - start
    synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * count / elapsed


def training_flops_per_image(step: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs of one forward + backward (the loss function `step` returns a scalar to backpropagate),
    per image, counted by torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions).

    Attention runs through the math kernel while counting, so it is counted on every device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        step().backward()
    return counter.get_total_flops() / batch_size


# ------------------------------------------------------------------------------------------
# Reporting: markdown tables, JSON, plots, environment
# ------------------------------------------------------------------------------------------


def format_value(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """du.markdown_table over dict rows: columns are (key, header, format), format "" (auto), "%" or a format spec."""
    headers = [header for _, header, _ in columns]
    return du.markdown_table(headers, [[format_value(row.get(key), spec) for key, _, spec in columns] for row in rows])


def to_jsonable(value: Any) -> Any:
    """Plain JSON: NaN and inf become null, tuples lists, tensors/arrays lists, dataclasses dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    return value


def save_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (a temp file then a rename), so an interrupted run keeps the last one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(temp, path)
    return path


def save_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def line_plot(
    panels: Sequence[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
    xlabel: str,
    title: str | None = None,
    percent: Sequence[bool] = (),
    ylims: Sequence[tuple[float | None, float | None] | None] = (),
) -> Any:
    """A row of line plots: panels are (y label, {series name: (xs, ys)}); percent[k] formats panel k's
    y axis as a percentage of 1, ylims[k] = (low, high) fixes its range. No pyplot, so no GUI."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(5.5 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for k, (ax, (ylabel, series)) in enumerate(zip(axes, panels)):
        for name, (xs, ys) in series.items():
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if k < len(percent) and percent[k]:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if k < len(ylims) and ylims[k] is not None:
            ax.set_ylim(*ylims[k])
        if len(series) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where and when a benchmark ran."""
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "precision": du.choose_precision(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
    return info


def environment_line(env: dict[str, Any]) -> str:
    load = env.get("load_average")
    load_text = f"; load average at start {load[0]:.2f}" if load else ""
    where = f"{env['device_name']} ({env['device']}, {env['precision']})"
    threads = f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads{load_text}"
    return f"{env['date']} · {where} · torch {env['torch']} · {threads} · commit {env['git_commit']}"


def mean_tail(values: Iterable[float], n: int = 50) -> float:
    """Mean of the last n values (the loss is too noisy per step), NaN if none."""
    values = list(values)[-n:]
    return float(np.mean(values)) if values else math.nan
