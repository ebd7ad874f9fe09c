"""Editing: sketch to shape (SDEdit), inpainting (replacement against RePaint) and DDIM inversion on one model.

Sketches edited at each --strengths value (valid share, class kept, centre and size errors against the intended
shape); real shapes with half hidden, by replacement and RePaint (--resample; valid, class kept, known pixels
changed); the DDIM inversion round trip (mean absolute error). Writes editing.json, .md and .png.

On the CPU checkpoint:
    python benchmarks/editing.py --checkpoint benchmarks/results/time_to_quality/recipe.pt --samples 256 \\
        --out benchmarks/results/editing
Smoke test (seconds; trains a tiny model on the spot):
    python benchmarks/editing.py --train-steps 3 --samples 4 --strengths 0.5,1 --steps 3 --inversion-steps 3 \\
        --threads 1 --out /tmp/bench_smoke/editing
"""

from __future__ import annotations

import sys

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import numpy as np
import torch

import diffusion_utils as du

NAME = "editing"
DATA_SEED = 2468  # the sketches and the shapes to inpaint
COLUMNS = bc.columns(
    "task; setting; valid||.3f; class_kept||.3f; center_error|centre error (px)|.2f; size_error|size error (px)|.2f",
    "within_2px|centre and size <= 2 px|.3f; known_changed|known pixels changed|.4f",
    "round_trip_error|round-trip error|.4f; seconds||.1f",
)


def parse_args(argv: list[str] | None):
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a checkpoint (du.load_model: EMA weights when saved)")
    strengths = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
    parser.add_argument("--strengths", type=bc.parse_floats, default=strengths, help="SDEdit strengths")
    parser.add_argument("--samples", type=bc.positive_int, default=256, help="images per cell (default 256)")
    parser.add_argument("--steps", type=bc.positive_int, default=du.DEFAULT_STEPS, help="full grid's steps")
    parser.add_argument("--resample", type=bc.positive_int, default=du.DEFAULT_RESAMPLE, help="RePaint's r")
    parser.add_argument("--inversion-steps", type=bc.parse_ints, default=[50, 100], help="DDIM steps (50,100)")
    return parser.parse_args(argv)


def against_intention(images: torch.Tensor, intended: du.ShapeBatch) -> dict:
    """Validity, and for the valid images the class kept and the centre and size errors against the intention."""
    scores = du.score_requests(images, intended.condition())
    valid = [s for s in scores if s.valid]

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "valid": mean([s.valid for s in scores]),
        "class_kept": mean([bool(s.scores["class"]) for s in valid]),
        "center_error": mean([s.scores["center"] for s in valid]),
        "size_error": mean([s.scores["size"] for s in valid]),
        "within_2px": mean([s.matches and s.scores["center"] <= 2 and s.scores["size"] <= 2 for s in scores]),
    }


def sketch_rows(model, schedule, args, device) -> list[dict]:
    sketches = du.make_sketches(args.samples, seed=DATA_SEED)
    options = {"steps": args.steps, "seed": bc.SAMPLE_SEED, "progress": False}
    rows = []
    for strength in args.strengths:
        run = lambda s=strength: du.edit(model, schedule, sketches.images, s, **options)  # noqa: E731
        result, seconds = bc.timed(run, device)
        scores = against_intention(result.images, sketches)
        row = {"task": "sketch to shape", "setting": f"strength {strength:g}", "strength": strength}
        rows.append({**row, **scores, "seconds": seconds})
        print(f"strength {strength:g}: valid {scores['valid']:.3f}, class kept {scores['class_kept']:.3f}", flush=True)
    return rows


def inpainting_rows(model, schedule, args, device) -> list[dict]:
    shapes = du.make_shapes(args.samples, seed=DATA_SEED)
    mask = du.make_masks(shapes, "half", seed=DATA_SEED)
    known = du.model_to_uint8(shapes.images)
    options = {"steps": args.steps, "seed": bc.SAMPLE_SEED, "progress": False}
    rows = []
    for resample in dict.fromkeys([1, args.resample]):
        run = lambda r=resample: du.inpaint(model, schedule, shapes.images, mask, r, **options)  # noqa: E731
        result, seconds = bc.timed(run, device)
        changed = float((du.model_to_uint8(result.images) != known)[mask.squeeze(1).numpy()].mean())
        name = "replacement" if resample == 1 else f"RePaint, r = {resample}"
        scores = against_intention(result.images, shapes)
        rows.append({"task": "inpaint half", "setting": name, **scores, "known_changed": changed, "seconds": seconds})
        print(f"{name}: valid {scores['valid']:.3f}, known pixels changed {changed:.4f}", flush=True)
    return rows


def inversion_rows(model, schedule, args, device) -> list[dict]:
    shapes = du.make_shapes(args.samples, seed=DATA_SEED)
    rows = []
    for steps in args.inversion_steps:

        def round_trip(steps=steps) -> torch.Tensor:
            latents = du.invert(model, schedule, shapes.images, steps=steps)
            options = {"steps": steps, "sampler": "ddim", "initial_noise": latents, "progress": False}
            return du.sample(model, schedule, len(shapes), **options).images

        decoded, seconds = bc.timed(round_trip, device)
        error = float((decoded - shapes.images).abs().mean())
        scores = against_intention(decoded, shapes)
        row = {"task": "DDIM inversion", "setting": f"{steps} steps", **scores, "round_trip_error": error}
        rows.append({**row, "seconds": seconds})
        print(f"inversion at {steps} steps: round-trip error {error:.4f}", flush=True)
    return rows


def plot_strengths(rows: list[dict]):
    """Validity and faithfulness (class kept, within 2 px) against the SDEdit strength."""
    fig = du._figure(5.5, 3.4)
    ax = fig.subplots()
    sketch = sorted((r for r in rows if r["task"] == "sketch to shape"), key=lambda r: r["strength"])
    for key, label in [("valid", "valid"), ("class_kept", "class kept"), ("within_2px", "centre and size <= 2 px")]:
        ax.plot([r["strength"] for r in sketch], [r[key] for r in sketch], "o-", label=label)
    ax.set_xlabel("strength (share of the time span noised)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sketch to shape: realism against faithfulness")
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = bc.load_or_train(args, device)
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    rows = sketch_rows(model, schedule, args, device)
    rows += inpainting_rows(model, schedule, args, device)
    rows += inversion_rows(model, schedule, args, device)
    setting = f"sampling: {du.DEFAULT_SAMPLER}, a {args.steps}-step grid, {args.samples} images per row"
    sections = [f"model: {source}", bc.markdown_table(rows, COLUMNS), setting]
    bc.write_report(args.out, NAME, "Editing: sketches, masks and inversion", env, sections, rows=rows)
    du.save_figure(plot_strengths(rows), args.out / f"{NAME}.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
