"""Shared plumbing for the benchmark scripts: the "previous" recipe, parsers, timing, FLOPs, reports.

Importing it puts the repository root on sys.path (for `import diffusion_utils as du`), where all diffusion logic
stays."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SEED = 1234  # the one sampling seed of every scored cell in RESULTS.md
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

# The "previous" recipe (RESULTS.md): the one definition that levers.py and time_to_quality.py use


def previous_recipe(device: torch.device | str = "cpu") -> tuple[du.ModelConfig, du.TrainConfig]:
    """The recipe before conditioning and the lr decay (RESULTS.md, "previous"); on CUDA, the GPU recipe of that
    round. Every field is spelled out, so that it stays put when today's defaults move."""
    device = torch.device(device)
    model = du.ModelConfig(
        schedule="cosine",
        num_timesteps=1000,
        prediction="v",
        base_channels=24,
        channel_mults=(1, 2),
        blocks_per_level=1,
        pixel_unshuffle=4,
        time_injection="every_block",
        bottleneck_attention=True,
        conditional=False,
        dropout=0.0,
    )
    train = du.TrainConfig(
        batch_size=32,
        lr=1e-3,
        warmup_steps=200,
        lr_schedule="constant",
        weight_decay=0.0,
        grad_clip=1.0,
        min_snr_gamma=5.0,
        min_snr_form="cap",
        ema_decay=0.998,
        condition_dropout=0.0,
        channels_last=device.type == "cpu",
        data_workers=0,
        compile_model=False,
    )
    if device.type != "cuda":
        return model, train
    model = dataclasses.replace(model, base_channels=64, channel_mults=(1, 2, 2), blocks_per_level=2, pixel_unshuffle=2)
    workers = min(4, max(1, (os.cpu_count() or 2) - 1))
    return model, dataclasses.replace(train, batch_size=256, ema_decay=0.999, channels_last=False, data_workers=workers)


# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_floats(text: str) -> list[float]:
    """ "3,6,9" -> [3.0, 6.0, 9.0]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}")
    return values


def parse_ints(text: str) -> list[int]:
    """ "1,2,2" -> [1, 2, 2]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def make_parser(doc: str, out_default: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as description, the rest (examples) as epilog, plus
    --out, --device, --seed and --threads."""
    summary, _, details = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=details
    )
    parser.add_argument("--out", default=out_default, help=f"folder for JSON, markdown and plots ({out_default})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or mps (default: du.pick_device(), the fastest available)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (sampling uses its own fixed seed)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the device of --device (or the fastest available)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return du.pick_device(args.device)


def add_model_override_args(parser: argparse.ArgumentParser) -> None:
    """Flags that change every configuration a script builds: smaller models for smoke tests, or one setting."""
    group = parser.add_argument_group("overrides of every configuration (smoke tests and experiments)")
    group.add_argument("--base-channels", type=int, help="ModelConfig.base_channels")
    group.add_argument("--channel-mults", type=parse_ints, help="ModelConfig.channel_mults, e.g. 1,2")
    group.add_argument("--batch-size", type=int, help="TrainConfig.batch_size")
    group.add_argument("--lr", type=float, help="TrainConfig.lr")
    group.add_argument("--lr-schedule", choices=du.LR_SCHEDULES, help="TrainConfig.lr_schedule")
    group.add_argument(
        "--conditional", action=argparse.BooleanOptionalAction, default=None, help="ModelConfig.conditional"
    )


def apply_overrides(
    model: du.ModelConfig, train: du.TrainConfig, args: argparse.Namespace
) -> tuple[du.ModelConfig, du.TrainConfig]:
    """The configurations with the command line's overrides (and seed) applied."""
    mults = getattr(args, "channel_mults", None)
    model_changes = {"base_channels": args.base_channels, "channel_mults": tuple(mults) if mults else None}
    model_changes["conditional"] = args.conditional
    train_changes = {key: getattr(args, key) for key in ("batch_size", "lr", "lr_schedule")}
    train_changes["seed"] = args.seed
    model = dataclasses.replace(model, **{k: v for k, v in model_changes.items() if v is not None})
    return model, dataclasses.replace(train, **{k: v for k, v in train_changes.items() if v is not None})


def prepare_out(path: str | os.PathLike) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


# One trained model to measure (samplers.py, guidance.py, editing.py)


def add_model_source_args(parser: argparse.ArgumentParser, checkpoint_help: str, required: bool = True) -> None:
    """--checkpoint or (smoke tests) --train-steps, one of them required (unless not): what load_or_train reads."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--checkpoint", help=checkpoint_help)
    source.add_argument("--train-steps", type=positive_int, help="smoke tests: train a tiny model this many steps")


def load_or_train(args: argparse.Namespace, device) -> tuple[du.UNet, du.NoiseSchedule, str]:
    """The checkpoint's sampling model, or (smoke tests) a tiny conditional model trained here."""
    if args.checkpoint:
        model, schedule = du.load_model(args.checkpoint, device=device)
        return model, schedule, f"{du.describe_model(model)}; checkpoint {args.checkpoint}"
    model_config = du.ModelConfig(base_channels=8, channel_mults=(1, 2), conditional=True)
    train_config = du.TrainConfig(batch_size=8, channels_last=False, seed=args.seed)
    trainer = du.Trainer(model_config, train_config, device=device)
    trainer.train(steps=args.train_steps, progress=False)
    return trainer.sampling_model.eval(), trainer.schedule, f"tiny model trained for {trainer.step} steps (smoke)"


# Timing, sampling and hardware rates


def train_step(trainer: du.Trainer, batch: tuple) -> torch.Tensor:
    """One Trainer.train_step with the kernels Trainer.train runs it with (TF32 maths for fp32 on CUDA)."""
    with trainer.runtime.compute():
        return trainer.train_step(*batch)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on the CPU)."""
    device = torch.device(device or "cpu")
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


def measure_throughput(
    steps: dict[str, Callable[[Any], Any]], batches: list, device: torch.device, seconds: float, rounds: int = 3
) -> dict[str, dict]:
    """images/s of each step function (called with one (images, condition) batch), timed in alternating rounds, so a
    busy machine slows the candidates alike; two warm-up steps each. On CUDA the device is synced every 5 steps."""
    batch_size = len(batches[0][0])
    totals = {name: [0, 0.0] for name in steps}
    for step in steps.values():
        step(batches[0])
        step(batches[1 % len(batches)])
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            count, start = 0, time.perf_counter()
            while True:
                step(batches[count % len(batches)])
                count += 1
                if count % 5 == 0 or device.type != "cuda":
                    synchronize(device)
                    if time.perf_counter() - start >= seconds / rounds:
                        break
            totals[name][0] += count
            totals[name][1] += time.perf_counter() - start
    return {name: {"steps": n, "seconds": s, "images_per_s": n * batch_size / s} for name, (n, s) in totals.items()}


def sample_and_evaluate(
    model, schedule, n: int, sampler: str, steps: int, device, seed: int = SAMPLE_SEED, batch_size: int = 256, **options
) -> tuple[dict[str, Any], torch.Tensor]:
    """Draw n images with du.sample (options: condition, guidance, spacing), timed, and score them with
    du.evaluate_samples. Returns (the metrics plus sampler, steps, sample_seconds and images_per_s, the images)."""
    kwargs = dict(steps=steps, sampler=sampler, seed=seed, batch_size=batch_size, progress=False, **options)
    result, seconds = timed(lambda: du.sample(model, schedule, n, **kwargs), device)
    scores = {"sampler": sampler, "steps": steps, "sample_seconds": seconds, "images_per_s": n / seconds}
    return {**scores, **du.evaluate_samples(result.images)}, result.images


def matmul_flops_per_second(device: torch.device | str, dtype: torch.dtype = torch.float32, seconds=1.0) -> float:
    """Measured rate of a large square torch.mm on this device (2 n^3 FLOPs per product)."""
    device = torch.device(device)
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0 or device.type != "cuda":
            synchronize(device)
    synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def training_flops_per_image(loss: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs of one forward + backward of `loss` (a function returning a scalar), per image, counted by
    FlopCounterMode (matmuls and convolutions; attention through the math kernel, so counted on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        loss().backward()
    return counter.get_total_flops() / batch_size


def mean_tail(values: Sequence[float], n: int = 50) -> float:
    """Mean of the last n values (the loss is too noisy per step), NaN if none."""
    values = list(values)[-n:]
    return float(np.mean(values)) if values else math.nan


# Reporting: markdown tables, JSON, the environment, a run's outputs


def format_value(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec:
        return format(value, spec)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def columns(*specs: str) -> list[tuple[str, str, str]]:
    """markdown_table's columns from "key|header|format" entries separated by ";": the header defaults to the key with
    spaces for underscores, the format to "" (auto). "steps; size_w1|size W1 (px)|.2f" -> [("steps", "steps", ""),
    ("size_w1", "size W1 (px)", ".2f")]."""
    result = []
    for entry in filter(None, (part.strip() for spec in specs for part in spec.split(";"))):
        key, header, spec = (entry.split("|") + ["", ""])[:3]
        result.append((key, header or key.replace("_", " "), spec))
    return result


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """du.markdown_table over dict rows: columns are (key, header, format), format "" (auto), "%" or a format spec."""
    headers = [header for _, header, _ in columns]
    return du.markdown_table(headers, [[format_value(row.get(key), spec) for key, _, spec in columns] for row in rows])


def save_json(path: str | os.PathLike, payload: Any) -> Path:
    """du.to_json's plain JSON, written atomically (a temp file, then a rename): a stopped run keeps the last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(du.to_json(payload), indent=2, allow_nan=False) + "\n")
    os.replace(temp, path)
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return run.stdout.strip() or None
    except OSError:
        return None


def environment(device: torch.device | str, script: str | None = None) -> dict[str, Any]:
    """Where and when a benchmark ran, and (given the script's __file__) the command that ran it."""
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "precision": du.choose_precision(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if script is not None:
        info["command"] = shlex.join(["python", Path(script).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])
    return info


def environment_line(env: dict[str, Any]) -> str:
    load = f"; load average at start {env['load_average'][0]:.2f}" if env.get("load_average") else ""
    where = f"{env['device_name']} ({env['device']}, {env['precision']})"
    threads = f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads{load}"
    return f"{env['date']} · {where} · torch {env['torch']} · {threads} · commit {env['git_commit']}"


def write_report(out: Path, name: str, title: str, env: dict, sections: Sequence[str], **payload: Any) -> str:
    """Print and write <out>/<name>.md (title, environment line, command, sections) and <out>/<name>.json (the
    environment, then the payload); returns the markdown."""
    command = [f"command: `{env['command']}`"] if "command" in env else []
    text = "\n\n".join([f"# {title}", environment_line(env), *command, *sections]) + "\n"
    print("\n" + text, flush=True)
    (out / f"{name}.md").write_text(text)
    save_json(out / f"{name}.json", {"benchmark": name, "environment": env, **payload})
    return text
