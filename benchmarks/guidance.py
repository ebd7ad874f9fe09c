"""Guidance: what does the guidance scale do?

A conditional model draws --samples images for each request kind at each classifier-free guidance scale in
--scales (module section 11: out = uncond + s (cond - uncond); s = 0 ignores the request, s = 1 is the plain
conditional model, s > 1 pushes harder). One fixed --sample-seed for every cell, so every cell starts from the
same noise, and --sampler / --steps (default: du.DEFAULT_SAMPLER, du.DEFAULT_STEPS) for all of them. Kinds:
  class              half the images asked for a circle, half for a square
  class+size+centre  requests copied from real data (du.make_shapes(n, seed=--data-seed).condition())
  size               the same real sizes only (no class, no centre)
  none               the null condition (condition=None), once: guidance has no effect without a request; the
                     unconditional baseline (any kind at s = 0 draws the same images)

Why: guidance buys faithfulness to the request with diversity, and costs a second network pass per step (at
s other than 0 and 1). Each cell is scored by du.evaluate_requests (valid, class_accuracy, matches, center_error,
size_error), by du.request_matches's share (valid, right class, centre and size within 3 px of what was asked:
"matches <= 3 px") and by du.evaluate_samples (mid_gray, circle_share), and its diversity is measured by
du.spread: the standard deviation in pixels of the sizes, and of the centres (x and y, averaged), read by
du.read_shape from the valid samples, pooled within each asked class for "class" requests. Diversity falls as
guidance rises: that is the trade-off. (Where size or centre are asked, their spread mostly follows the requests,
i.e. real data's spread: read diversity on the "class" and "none" rows.) Shares stay raw, in [0, 1].

A "best guidance" line follows the table: the smallest scale that maximises class accuracy x validity for
"class" requests, and the one that maximises "matches <= 3 px" for "class+size+centre" (with its matches, centre
and size errors).

Writes guidance.json (rewritten after every cell), guidance.md, guidance.png (du.plot_guidance_sweep, with gray
lines for "none") and guidance_grid.png (rows: a few requests, columns: the scales, one sample each from the same
starting noise per row, outlined green where du.request_matches accepts it). An unconditional checkpoint is refused.

The table of RESULTS.md (19 cells of 256 images at 100 DDPM steps; twice the passes at s other than 0 and 1):
    python benchmarks/guidance.py --checkpoint benchmarks/results/time_to_quality/recipe.pt --samples 256 \\
        --out benchmarks/results/guidance
Smoke test (seconds; trains a tiny conditional model on the spot):
    python benchmarks/guidance.py --train-steps 3 --samples 8 --scales 0,1,2 --steps 3 --threads 1 \\
        --out /tmp/bench_smoke/guidance
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import numpy as np
import torch

import diffusion_utils as du

NAME = "guidance"
TITLE = "Guidance: what does the guidance scale do?"
DEFAULT_SCALES = "0,1,1.5,2,3,5"
KINDS = ("class", "class+size+centre", "size")  # swept over the scales
BASELINE = "none"  # the null condition, sampled once
UNCONDITIONAL = "an unconditional model (trained without requests) cannot be guided: train one with --conditional"
GRID_REQUESTS = [("circle", None, None), ("square", None, None), ("circle", 21, (24, 40)), ("square", 33, (36, 30))]

COLUMNS = [
    ("kind", "request", ""),
    ("scale", "scale", "g"),
    ("evaluations", "network evals / image", ""),
    ("valid", "valid", ".3f"),
    ("class_accuracy", "class accuracy", ".3f"),
    ("matches", "matches", ".3f"),
    ("matches_3px", "matches <= 3 px", ".3f"),
    ("center_error", "centre error (px)", ".2f"),
    ("size_error", "size error (px)", ".2f"),
    ("size_sd", "size SD (px)", ".2f"),
    ("center_sd", "centre SD (px)", ".2f"),
    ("mid_gray", "mid-gray", ".3f"),
    ("circle_share", "circle share", ".3f"),
    ("seconds", "seconds", ".2f"),
]


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def parse_scales(text: str) -> list[float]:
    """ "0,1,2" -> [0.0, 1.0, 2.0]: finite, >= 0, sorted, without repeats."""
    values = bc.parse_floats(text)
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"guidance scales are numbers >= 0, got {text!r}")
    return sorted(set(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a conditional checkpoint (du.load_model: EMA weights when saved)")
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=parse_scales(DEFAULT_SCALES),
        help=f"guidance scales (default {DEFAULT_SCALES})",
    )
    parser.add_argument("--samples", type=bc.positive_int, default=256, help="images per cell (default 256)")
    parser.add_argument("--sampler", choices=list(du.SAMPLERS), default=du.DEFAULT_SAMPLER, help="default %(default)s")
    parser.add_argument(
        "--steps", type=bc.positive_int, default=du.DEFAULT_STEPS, help="sampling steps (default %(default)s)"
    )
    parser.add_argument("--sample-seed", type=int, default=1234, help="sampling seed, the same for every cell")
    parser.add_argument("--data-seed", type=int, default=4321, help="seed of the real data the requests copy")
    parser.add_argument("--chunk", type=bc.positive_int, default=256, help="images per du.sample chunk (default 256)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------


def class_requests(n: int) -> du.Condition:
    """The first half (rounded up) asked for a circle, the rest for a square; nothing else given."""
    half, null = (n + 1) // 2, du.Condition.null(n)
    labels = torch.tensor([du.CIRCLE] * half + [du.SQUARE] * (n - half))
    return du.Condition(labels, null.centers, null.sizes)


def size_requests(condition: du.Condition) -> du.Condition:
    """Only the sizes of `condition`: no class, no centre."""
    null = du.Condition.null(len(condition))
    return du.Condition(null.labels, null.centers, condition.sizes.clone())


def sweep_requests(n: int, data_seed: int) -> dict[str, du.Condition]:
    """A Condition of n requests per swept kind."""
    real = du.make_shapes(n, seed=data_seed).condition()
    return {"class": class_requests(n), "class+size+centre": real, "size": size_requests(real)}


def grid_requests() -> du.Condition:
    """One request per row of the picture grid."""
    conditions = [du.request(1, shape, size, center) for shape, size, center in GRID_REQUESTS]
    combined = conditions[0]
    for condition in conditions[1:]:
        combined = combined.cat(condition)
    return combined


# ------------------------------------------------------------------------------------------
# One cell: sample, score, measure the spread
# ------------------------------------------------------------------------------------------


def draw(model, schedule, args: argparse.Namespace, condition: du.Condition | None, scale: float, device):
    """(du.evaluate_samples's scores and the sampling seconds, the images) for n = len(condition) requests, or
    args.samples unconditional images."""
    n = len(condition) if condition is not None else args.samples
    options = {"seed": args.sample_seed, "batch_size": args.chunk, "condition": condition, "guidance": scale}
    return bc.sample_and_evaluate(model, schedule, n, args.sampler, args.steps, device, **options)


def evaluations_per_image(steps: int, condition: du.Condition | None, scale: float) -> int:
    """Network passes per image: guidance at s other than 0 and 1 runs the conditional and unconditional ones."""
    return steps * (2 if condition is not None and scale not in (0, 1) else 1)


def run_cell(model, schedule, args, kind: str, condition: du.Condition | None, scale: float | None, device) -> dict:
    """The cell's row: the request scores, the sample scores, the spread and the timing."""
    scores, images = draw(model, schedule, args, condition, du.DEFAULT_GUIDANCE if scale is None else scale, device)
    asked = condition if condition is not None else du.Condition.null(len(images))
    request_scores = du.evaluate_requests(images, asked)
    return {
        "kind": kind,
        "scale": scale,
        "evaluations": evaluations_per_image(args.steps, condition, scale or 0.0),
        "seconds": scores["sample_seconds"],
        **request_scores,
        "matches_3px": float(np.mean(du.request_matches(images, asked))),
        "mid_gray": scores["mid_gray"],
        "circle_share": scores["circle_share"],
        **du.spread(images, asked if kind == "class" else None),  # pooled within each asked class for "class"
    }


def sweep(model, schedule, args: argparse.Namespace, device, env: dict) -> list[dict]:
    """Every kind at every scale, then the unconditional baseline once; the JSON is rewritten after every cell."""
    requests = sweep_requests(args.samples, args.data_seed)
    cells = [(kind, requests[kind], scale) for kind in KINDS for scale in args.scales] + [(BASELINE, None, None)]
    rows = []
    for kind, condition, scale in cells:
        rows.append(run_cell(model, schedule, args, kind, condition, scale, device))
        row = rows[-1]
        at = "" if scale is None else f" at s = {scale:g}"
        print(f"{kind}{at}: {row['seconds']:.2f} s, valid {row['valid']:.3f}, matches {row['matches']:.3f}", flush=True)
        bc.save_json(Path(args.out) / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    return rows


# ------------------------------------------------------------------------------------------
# Best guidance
# ------------------------------------------------------------------------------------------


def zero_if_nan(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def smallest_best(rows: list[dict], score) -> dict | None:
    """The row of the smallest scale whose score is the highest (None without rows)."""
    if not rows:
        return None
    best = max(score(r) for r in rows)
    return min((r for r in rows if score(r) >= best - 1e-12), key=lambda r: r["scale"])


def best_guidance(rows: list[dict]) -> dict[str, Any]:
    """For "class": the smallest scale maximising class accuracy x validity; for "class+size+centre": the
    smallest maximising matches <= 3 px."""
    class_rows = [r for r in rows if r["kind"] == "class"]
    full_rows = [r for r in rows if r["kind"] == "class+size+centre"]
    by_class = smallest_best(class_rows, lambda r: zero_if_nan(r["class_accuracy"]) * r["valid"])
    by_request = smallest_best(full_rows, lambda r: r["matches_3px"])
    keys = ("scale", "valid", "class_accuracy", "matches", "matches_3px", "center_error", "size_error")
    return {
        "class": {key: by_class[key] for key in keys} if by_class else None,
        "class+size+centre": {key: by_request[key] for key in keys} if by_request else None,
    }


def best_guidance_line(best: dict[str, Any]) -> str:
    parts = []
    if best["class"]:
        row = best["class"]
        product = zero_if_nan(row["class_accuracy"]) * row["valid"]
        parts.append(
            f"class requests s = {row['scale']:g} (class accuracy {bc.format_value(row['class_accuracy'], '.3f')}"
            f" x valid {row['valid']:.3f} = {product:.3f})"
        )
    if best["class+size+centre"]:
        row = best["class+size+centre"]
        errors = [bc.format_value(row[key], ".2f") for key in ("center_error", "size_error")]
        parts.append(
            f"class+size+centre requests s = {row['scale']:g} (matches <= 3 px {row['matches_3px']:.3f};"
            f" matches {row['matches']:.3f}, centre error {errors[0]} px, size error {errors[1]} px)"
        )
    return "best guidance: " + ("; ".join(parts) if parts else "no swept rows")


# ------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------


BASELINE_LINES = [  # per panel of du.plot_guidance_sweep, the baseline's [(row key, line style, series name)]
    [("class_accuracy", "-", "class accuracy"), ("matches", "--", "matches")],
    [("valid", "-", "")],
    [("size_sd", "-", "size"), ("center_sd", "--", "centre")],
]


def plot_sweep(rows: list[dict]):
    """du.plot_guidance_sweep of the swept kinds, with the unconditional baseline ("none") as gray lines on top."""
    fig = du.plot_guidance_sweep([r for r in rows if r["kind"] != BASELINE])
    baseline = next((r for r in rows if r["kind"] == BASELINE), None)
    for ax, lines in zip(fig.axes, BASELINE_LINES if baseline is not None else []):
        for key, style, name in lines:
            if baseline[key] is not None and not math.isnan(baseline[key]):
                label = f"{BASELINE} (baseline), {name}" if name else f"{BASELINE} (baseline)"
                ax.axhline(baseline[key], color="gray", linestyle=style, linewidth=1, label=label)
        if ax.get_legend_handles_labels()[0]:  # nothing to label where every value is NaN (no valid sample)
            ax.legend(fontsize=7)
    return fig


def plot_request_grid(model, schedule, args: argparse.Namespace, device):
    """Rows: GRID_REQUESTS; columns: the scales; one sample per cell, the same starting noise along a row."""
    condition = grid_requests()
    per_scale = [draw(model, schedule, args, condition, scale, device)[1] for scale in args.scales]
    outlines = [du.request_matches(images, condition) for images in per_scale]
    rows, columns = len(condition), len(args.scales)
    images = torch.stack(per_scale, dim=1).reshape(rows * columns, *per_scale[0].shape[1:])  # row-major
    outline = [outlines[c][r] for r in range(rows) for c in range(columns)]
    titles = []
    for r in range(rows):
        label = textwrap.fill(du.describe_request(condition, r), 16)
        titles += [f"{label}\ns = {scale:g}" if c == 0 else f"s = {scale:g}" for c, scale in enumerate(args.scales)]
    title = f"Requests x guidance scale ({args.sampler}, {args.steps} steps; green: du.request_matches)"
    return du.plot_grid(images, titles, columns=columns, title=textwrap.fill(title, 10 * columns), outline=outline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = bc.load_or_train(args, device)
    if not model.config.conditional:
        print(f"{args.checkpoint}: {UNCONDITIONAL}", file=sys.stderr)
        return 2
    out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    rows = sweep(model, schedule, args, device, env)
    grid_figure = plot_request_grid(model, schedule, args, device)
    best = best_guidance(rows)
    setting = f"sampling: {args.sampler}, {args.steps} steps, {args.samples} images per cell"
    sections = [f"model: {source}", bc.markdown_table(rows, COLUMNS), setting, best_guidance_line(best)]
    bc.write_report(out, NAME, TITLE, env, sections, model=model.config, rows=rows, best_guidance=best)
    du.save_figure(plot_sweep(rows), out / f"{NAME}.png", dpi=110)
    du.save_figure(grid_figure, out / f"{NAME}_grid.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
