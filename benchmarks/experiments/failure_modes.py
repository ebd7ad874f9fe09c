"""Failure modes: why are the invalid samples invalid, and where do the mid-gray pixels lie?

Each invalid sample is sorted as a blank frame, several blobs, or one blob with too low an IoU (with its bounding
box's width/height ratio); the mid-gray pixels are split into soft edges (within a pixel of a boundary), inside a
shape, and background haze. Sampled unconditionally. Why: choosing a fix for the failures (the loss weight, the
sampler, the last layer) needs to know what they are (RESULTS.md, "Where the mid-gray pixels come from").

The analysis of RESULTS.md (the samples are those of DDPM-100 with sampling seed 1):
    python benchmarks/experiments/failure_modes.py --checkpoint benchmarks/results/time_to_quality/recipe.pt \\
        --samples 512 --out benchmarks/results/failure_modes
Without --checkpoint it first trains the device's recipe for --train-minutes (or --train-steps).
Smoke test (seconds):
    python benchmarks/experiments/failure_modes.py --train-steps 5 --samples 8 --base-channels 8 \\
        --channel-mults 1,2 --batch-size 8 --threads 1 --out /tmp/failure_modes
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common (which adds the repo root)

import _common as bc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

SAMPLING_SEED = 1


def parse_sampler(text: str) -> tuple[str, int]:
    """ "ddpm:100" -> ("ddpm", 100); names from du.SAMPLERS."""
    name, _, steps = text.partition(":")
    if name not in du.SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:STEPS with NAME of {', '.join(du.SAMPLERS)}, got {text!r}")
    return name, int(steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, "runs/experiments/failure_modes")
    parser.add_argument("--checkpoint", help="a checkpoint to sample (default: train the device's recipe first)")
    parser.add_argument("--train-minutes", type=float, default=15.0, help="without --checkpoint (default 15)")
    parser.add_argument("--train-steps", type=int, help="without --checkpoint: a step budget instead of minutes")
    parser.add_argument("--samples", type=int, default=256, help="images to draw (default 256)")
    parser.add_argument("--sampler", type=parse_sampler, default=("ddpm", 100), help="NAME:STEPS (default ddpm:100)")
    parser.add_argument("--boxes", type=int, default=25, help="one-blob failures listed with their box (default 25)")
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def sampling_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, du.NoiseSchedule, str]:
    """(the sampling network, its schedule, where it came from): the checkpoint, or the recipe trained here."""
    if args.checkpoint:
        model, schedule = du.load_model(args.checkpoint, device=device)
        return model, schedule, args.checkpoint
    trainer = du.Trainer(*bc.apply_overrides(*du.default_configs(device, "diffusion"), args), device=device)
    minutes = None if args.train_steps else args.train_minutes
    trainer.train(steps=args.train_steps, minutes=minutes, progress=False)
    return trainer.sampling_model, trainer.schedule, f"the recipe trained here ({trainer.images_seen:,} images)"


def failure_kind(reading: du.ShapeReading) -> str:
    """Why one invalid reading is invalid."""
    if reading.blobs == 0:
        return "blank"
    shape = du.CLASS_NAMES[reading.label]
    return f"several blobs ({shape})" if reading.blobs > 1 else f"low IoU ({shape})"


def mid_gray_split(images: np.ndarray) -> dict[str, float]:
    """The share of all pixels that are mid-gray, and of those within a pixel of a boundary, inside, outside."""
    mask, mid, edge = images > 127, du.mid_gray_mask(images), bc.edge_band(images)
    return {
        "mid_gray": float(mid.mean()),
        "at_boundary": float((mid & edge).mean()),
        "inside": float((mid & mask & ~edge).mean()),
        "background": float((mid & ~mask & ~edge).mean()),
    }


def one_blob_boxes(images: np.ndarray, readings: list[du.ShapeReading]) -> list[dict]:
    """For each one-blob failure: its class, IoU, bounding box, aspect ratio and how much of the box it fills."""
    boxes = []
    for k, reading in enumerate(readings):
        if reading.valid or reading.blobs != 1:
            continue
        ys, xs = np.nonzero(images[k] > 127)
        width, height = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        fills = float((images[k] > 127).sum() / (width * height))
        row = {"image": k, "shape": du.CLASS_NAMES[reading.label], "iou": reading.iou, "box": f"{width}x{height}"}
        boxes.append({**row, "aspect": width / height, "fills": fills})
    return boxes


BOX_COLUMNS = bc.columns(
    "image; shape|matches best; iou|IoU|.3f; box|bounding box; aspect|w / h|.2f; fills|fills of its box|.2f",
)


def report(source: str, scores: dict, kinds: collections.Counter, split: dict, boxes: list[dict], args) -> str:
    sampler, steps = args.sampler
    lines = [
        f"# Failure modes of {source}",
        f"{args.samples} samples, {sampler} {steps} steps, sampling seed {SAMPLING_SEED}: valid {scores['valid']:.1%}, "
        f"mid-gray {scores['mid_gray']:.2%}, circle share {bc.format_value(scores['circle_share'], '.2f')}",
        "## Why the invalid ones are invalid\n\n"
        + du.markdown_table(["kind", "images"], sorted(kinds.items(), key=lambda kv: -kv[1]) or [["none", 0]]),
        "## Where the mid-gray pixels lie (shares of all pixels)\n\n"
        + du.markdown_table(list(split), [[f"{100 * v:.2f} %" for v in split.values()]]),
        f"## One-blob failures (first {args.boxes})\n\n" + bc.markdown_table(boxes[: args.boxes], BOX_COLUMNS),
    ]
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = sampling_model(args, device)
    sampler, steps = args.sampler
    result = du.sample(model, schedule, args.samples, steps=steps, sampler=sampler, seed=SAMPLING_SEED, progress=False)
    images = du.model_to_uint8(result.images)
    readings = [du.read_shape(image) for image in images]
    scores = du.evaluate_samples(images)
    kinds = collections.Counter(failure_kind(r) for r in readings if not r.valid)
    split, boxes = mid_gray_split(images), one_blob_boxes(images, readings)
    text = report(source, scores, kinds, split, boxes, args)
    print(text)
    out = bc.prepare_out(args.out)
    payload = {"source": source, "args": vars(args), "scores": scores, "failures": kinds, "mid_gray": split}
    bc.save_json(out / "failure_modes.json", {**payload, "one_blob_failures": boxes})
    (out / "failure_modes.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
