"""Guidance: what does the guidance scale buy? (RESULTS.md, "Guidance: what does the guidance scale buy?")

A conditional model draws --samples images per request kind ("class", "class+size+centre" of real shapes, "size",
once "none") at each guidance scale s (out = u + s (c - u)), all from the same noise, scored for faithfulness
(du.evaluate_requests, du.request_matches), quality and diversity (du.spread). Guidance buys faithfulness with
diversity and, at s other than 0 and 1, a second network pass per step.

RESULTS.md gives the command of its table. Smoke test (seconds; trains a tiny conditional model on the spot):
    python benchmarks/guidance.py --train-steps 3 --samples 8 --scales 0,1,2 --steps 3 --threads 1 \\
        --out /tmp/bench_smoke/guidance
"""

from __future__ import annotations

import math
import sys
import textwrap

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import numpy as np
import torch

import diffusion_utils as du

NAME = "guidance"
DATA_SEED = 4321  # the real shapes whose requests "class+size+centre" and "size" copy
GRID_REQUESTS = [("circle", None, None), ("square", None, None), ("circle", 21, (24, 40)), ("square", 33, (36, 30))]
COLUMNS = bc.columns(
    "kind|request; scale||g; evaluations|network evals / image; valid||.3f; class_accuracy||.3f; matches||.3f",
    "matches_3px|matches <= 3 px|.3f; center_error|centre error (px)|.2f; size_error|size error (px)|.2f",
    "size_sd|size SD (px)|.2f; center_sd|centre SD (px)|.2f; mid_gray|mid-gray|.3f; circle_share||.3f; seconds||.2f",
)
BASELINE_LINES = [  # per panel of du.plot_guidance_sweep: the "none" row's (key, line style, series name)
    [("class_accuracy", "-", "class accuracy"), ("matches", "--", "matches")],
    [("valid", "-", "")],
    [("size_sd", "-", "size"), ("center_sd", "--", "centre")],
]


def parse_args(argv: list[str] | None):
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a conditional checkpoint (du.load_model: EMA weights when saved)")
    parser.add_argument("--scales", type=bc.parse_floats, default=[0, 1, 1.5, 2, 3, 5], help="scales s (0,1,1.5,2,3,5)")
    parser.add_argument("--samples", type=bc.positive_int, default=256, help="images per cell (default 256)")
    parser.add_argument("--steps", type=bc.positive_int, default=du.DEFAULT_STEPS, help="DDPM steps (default 100)")
    args = parser.parse_args(argv)
    args.scales = sorted(set(args.scales))
    return args


def sweep_requests(n: int) -> dict[str, du.Condition]:
    """n requests of each swept kind."""
    null, real = du.Condition.null(n), du.make_shapes(n, seed=DATA_SEED).condition()
    labels = torch.tensor([du.CIRCLE] * ((n + 1) // 2) + [du.SQUARE] * (n // 2))
    return {
        "class": du.Condition(labels, null.centers, null.sizes),
        "class+size+centre": real,
        "size": du.Condition(null.labels, null.centers, real.sizes.clone()),
    }


def run_cell(model, schedule, args, kind: str, condition: du.Condition | None, scale: float | None, device) -> dict:
    """One cell's row: the request scores, the sample scores, the spread and the timing."""
    n = len(condition) if condition is not None else args.samples
    guidance = du.DEFAULT_GUIDANCE if scale is None else scale
    options = {"condition": condition, "guidance": guidance}
    scores, images = bc.sample_and_evaluate(model, schedule, n, "ddpm", args.steps, device, **options)
    asked = condition if condition is not None else du.Condition.null(n)
    evaluations = args.steps * (2 if condition is not None and guidance not in (0, 1) else 1)
    row = {"kind": kind, "scale": scale, "evaluations": evaluations, "seconds": scores["sample_seconds"]}
    row |= du.evaluate_requests(images, asked) | {"matches_3px": float(np.mean(du.request_matches(images, asked)))}
    row |= {key: scores[key] for key in ("mid_gray", "circle_share")}
    return row | du.spread(images, asked if kind == "class" else None)  # pooled within each asked class for "class"


def sweep(model, schedule, args, device, env: dict) -> list[dict]:
    """Every kind at every scale, then "none" once; the JSON is rewritten after every cell."""
    cells = [(kind, condition, s) for kind, condition in sweep_requests(args.samples).items() for s in args.scales]
    rows = []
    for kind, condition, scale in [*cells, ("none", None, None)]:
        rows.append(run_cell(model, schedule, args, kind, condition, scale, device))
        at = "" if scale is None else f" at s = {scale:g}"
        print(f"{kind}{at}: valid {rows[-1]['valid']:.3f}, matches {rows[-1]['matches']:.3f}", flush=True)
        bc.save_json(args.out / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    return rows


def plot_sweep(rows: list[dict]):
    """du.plot_guidance_sweep of the swept kinds, with the "none" row as gray lines."""
    fig = du.plot_guidance_sweep([r for r in rows if r["kind"] != "none"])
    baseline = rows[-1]
    for ax, lines in zip(fig.axes, BASELINE_LINES):
        for key, style, name in lines:
            if baseline[key] is not None and not math.isnan(baseline[key]):
                label = "none (baseline)" + (f", {name}" if name else "")
                ax.axhline(baseline[key], color="gray", linestyle=style, linewidth=1, label=label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def plot_request_grid(model, schedule, args, device):
    """Rows: GRID_REQUESTS; columns: the scales; one sample per cell, the same starting noise along a row."""
    condition = du.request(1, *GRID_REQUESTS[0])
    for shape, size, center in GRID_REQUESTS[1:]:
        condition = condition.cat(du.request(1, shape, size, center))
    options = {"steps": args.steps, "seed": bc.SAMPLE_SEED, "condition": condition, "progress": False}
    per_scale = [du.sample(model, schedule, len(condition), guidance=s, **options).images for s in args.scales]
    rows, columns = len(condition), len(args.scales)
    images = torch.stack(per_scale, dim=1).reshape(rows * columns, *per_scale[0].shape[1:])  # row-major
    matches = [du.request_matches(batch, condition) for batch in per_scale]
    outline = [matches[c][r] for r in range(rows) for c in range(columns)]
    names = [textwrap.fill(du.describe_request(condition, r), 16) + "\n" for r in range(rows)]
    titles = [(names[r] if c == 0 else "") + f"s = {args.scales[c]:g}" for r in range(rows) for c in range(columns)]
    title = textwrap.fill(f"Requests x guidance scale (ddpm, {args.steps} steps; green: matches)", 10 * columns)
    return du.plot_grid(images, titles, columns=columns, title=title, outline=outline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = bc.load_or_train(args, device)
    if not model.config.conditional:
        print(f"{args.checkpoint}: an unconditional model cannot be guided", file=sys.stderr)
        return 2
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    rows = sweep(model, schedule, args, device, env)
    setting = f"sampling: ddpm, {args.steps} steps, {args.samples} images per cell"
    sections = [f"model: {source}", bc.markdown_table(rows, COLUMNS), setting]
    title = "Guidance: what does the guidance scale buy?"
    bc.write_report(args.out, NAME, title, env, sections, model=model.config, rows=rows)
    du.save_figure(plot_sweep(rows), args.out / f"{NAME}.png", dpi=110)
    du.save_figure(plot_request_grid(model, schedule, args, device), args.out / f"{NAME}_grid.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
