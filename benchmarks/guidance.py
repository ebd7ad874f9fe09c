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
"matches <= 3 px") and by du.evaluate_samples (mid_gray, circle_share), and its diversity is measured: the
standard deviation in pixels of the sizes, and of the centres (x and y, averaged), read by du.read_shape from the
valid samples, pooled within each asked class for "class" requests. Diversity falls as guidance rises: that is
the trade-off. (Where size or centre are asked, their spread mostly follows the requests, i.e. real data's
spread: read diversity on the "class" and "none" rows.) Shares stay raw, in [0, 1].

A "best guidance" line follows the table: the smallest scale that maximises class accuracy x validity for
"class" requests, and the one that maximises "matches <= 3 px" for "class+size+centre" (with its matches, centre
and size errors).

Writes <out>/guidance.json (environment, arguments, every row, the best scales), <out>/guidance.md (the table,
under the environment line, the command and the date), <out>/guidance.png (accuracy, validity and diversity
against the scale, one line per kind) and <out>/guidance_grid.png (rows: a few requests, columns: the scales, one
sample each from the same starting noise per row, outlined green where du.request_matches accepts it). The JSON
is rewritten after every cell, so an interrupted run keeps what it measured. An unconditional checkpoint is
refused (exit 2).

Full run (a conditional checkpoint, e.g. from `python diffusion_utils.py train --conditional --minutes 25
--out runs/conditional.pt`; 19 cells of 256 images at 100 DDPM steps; twice the passes at s other than 0 and 1):
    python benchmarks/guidance.py --checkpoint runs/conditional.pt --out benchmarks/results/guidance
Smoke test (seconds; trains a tiny conditional model on the spot):
    python benchmarks/guidance.py --train-steps 3 --samples 8 --scales 0,1,2 --steps 3 --threads 1 \\
        --out /tmp/bench_smoke/guidance
"""

from __future__ import annotations

import argparse
import math
import shlex
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a conditional checkpoint (du.load_model: EMA weights when saved)")
    source.add_argument("--train-steps", type=positive_int, help="smoke tests: train a tiny model this many steps")
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=parse_scales(DEFAULT_SCALES),
        help=f"guidance scales (default {DEFAULT_SCALES})",
    )
    parser.add_argument("--samples", type=positive_int, default=256, help="images per cell (default 256)")
    parser.add_argument("--sampler", choices=list(du.SAMPLERS), default=du.DEFAULT_SAMPLER, help="default %(default)s")
    parser.add_argument(
        "--steps", type=positive_int, default=du.DEFAULT_STEPS, help="sampling steps (default %(default)s)"
    )
    parser.add_argument("--sample-seed", type=int, default=1234, help="sampling seed, the same for every cell")
    parser.add_argument("--data-seed", type=int, default=4321, help="seed of the real data the requests copy")
    parser.add_argument("--chunk", type=positive_int, default=256, help="images per du.sample chunk (default 256)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


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
    """(the images, wall seconds) for n = len(condition) requests, or args.samples unconditional images."""
    n = len(condition) if condition is not None else args.samples
    result, seconds = bc.timed(
        lambda: du.sample(
            model,
            schedule,
            n,
            steps=args.steps,
            sampler=args.sampler,
            seed=args.sample_seed,
            condition=condition,
            guidance=scale,
            batch_size=args.chunk,
            progress=False,
        ),
        device,
    )
    return result.images, seconds


def pooled_sd(groups: list[np.ndarray]) -> float:
    """The pooled standard deviation of groups of values (those with two or more); NaN if there are none."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return math.nan
    squares = sum((len(g) - 1) * float(np.var(g, ddof=1)) for g in groups)
    return math.sqrt(squares / sum(len(g) - 1 for g in groups))


def diversity(images: torch.Tensor, condition: du.Condition, by_class: bool) -> dict[str, float]:
    """Size SD and centre SD (x and y averaged) in pixels of the valid samples' readings, pooled within each asked
    class when by_class (so the circle/square mix is not counted as spread)."""
    readings = [du.read_shape(image) for image in du.model_to_uint8(images)]
    labels = condition.labels.cpu().numpy() if by_class else np.zeros(len(readings), dtype=int)
    groups = []
    for label in np.unique(labels):
        valid = [r for r, asked in zip(readings, labels) if asked == label and r.valid]
        groups.append(np.array([[r.size, *r.center] for r in valid]).reshape(-1, 3))
    size_sd = pooled_sd([g[:, 0] for g in groups])
    center_sd = (pooled_sd([g[:, 1] for g in groups]) + pooled_sd([g[:, 2] for g in groups])) / 2
    return {"size_sd": size_sd, "center_sd": center_sd}


def evaluations_per_image(steps: int, condition: du.Condition | None, scale: float) -> int:
    """Network passes per image: guidance at s other than 0 and 1 runs the conditional and unconditional ones."""
    return steps * (2 if condition is not None and scale not in (0, 1) else 1)


def run_cell(model, schedule, args, kind: str, condition: du.Condition | None, scale: float | None, device) -> dict:
    """The cell's row: the request scores, the sample scores, the spread and the timing."""
    images, seconds = draw(model, schedule, args, condition, du.DEFAULT_GUIDANCE if scale is None else scale, device)
    asked = condition if condition is not None else du.Condition.null(len(images))
    request_scores = du.evaluate_requests(images, asked)
    sample_scores = du.evaluate_samples(images)
    return {
        "kind": kind,
        "scale": scale,
        "evaluations": evaluations_per_image(args.steps, condition, scale or 0.0),
        "seconds": seconds,
        **request_scores,
        "matches_3px": float(np.mean(du.request_matches(images, asked))),
        "mid_gray": sample_scores["mid_gray"],
        "circle_share": sample_scores["circle_share"],
        **diversity(images, asked, by_class=kind == "class"),
    }


def sweep(model, schedule, args: argparse.Namespace, device, out: Path, run: dict[str, Any]) -> list[dict]:
    """Every kind at every scale, then the unconditional baseline once; the JSON is rewritten after every cell."""
    requests = sweep_requests(args.samples, args.data_seed)
    cells = [(kind, requests[kind], scale) for kind in KINDS for scale in args.scales] + [(BASELINE, None, None)]
    rows = []
    for kind, condition, scale in cells:
        rows.append(run_cell(model, schedule, args, kind, condition, scale, device))
        row = rows[-1]
        at = "" if scale is None else f" at s = {scale:g}"
        print(f"{kind}{at}: {row['seconds']:.2f} s, valid {row['valid']:.3f}, matches {row['matches']:.3f}", flush=True)
        save_json(out, {**run, "rows": rows, "partial": True})
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


PANELS = [  # (y label, is a share in [0, 1], [(row key, line style, series name)])
    ("accuracy (share)", True, [("class_accuracy", "-", "class accuracy"), ("matches", "--", "matches")]),
    ("valid (share)", True, [("valid", "-", "")]),
    ("spread of valid samples (px)", False, [("size_sd", "-", "size SD"), ("center_sd", "--", "centre SD")]),
]


def plot_sweep(rows: list[dict]):
    """Accuracy, validity and diversity against the scale: a colour per request kind, gray lines for none."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    baseline = next((r for r in rows if r["kind"] == BASELINE), None)
    for ax, (ylabel, share, metrics) in zip(fig.subplots(1, len(PANELS)), PANELS):
        for k, kind in enumerate(KINDS):
            kind_rows = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["scale"])
            for key, style, name in metrics:
                values = [math.nan if r[key] is None else r[key] for r in kind_rows]
                if all(math.isnan(v) for v in values):
                    continue
                label = f"{kind}, {name}" if name else kind
                ax.plot([r["scale"] for r in kind_rows], values, style, marker="o", ms=3, color=f"C{k}", label=label)
        for key, style, name in metrics:
            if baseline is not None and not math.isnan(baseline[key]):
                label = f"{BASELINE} (baseline), {name}" if name else f"{BASELINE} (baseline)"
                ax.axhline(baseline[key], color="gray", linestyle=style, linewidth=1, label=label)
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(ylabel)
        if share:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label where every value is NaN (no valid sample)
            ax.legend(fontsize=7)
    fig.suptitle("What the guidance scale does")
    return fig


def plot_request_grid(model, schedule, args: argparse.Namespace, device):
    """Rows: GRID_REQUESTS; columns: the scales; one sample per cell, the same starting noise along a row."""
    condition = grid_requests()
    per_scale = [draw(model, schedule, args, condition, scale, device)[0] for scale in args.scales]
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


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


def command_line(argv: list[str] | None) -> str:
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(__file__).name}", *arguments])


def describe_run(args: argparse.Namespace, device, argv: list[str] | None) -> dict[str, Any]:
    """What every output starts with: the environment (its date first), the command and the arguments."""
    return {"environment": bc.environment(device), "command": command_line(argv), "args": vars(args)}


def report(run: dict[str, Any], table: str, notes: list[str]) -> str:
    """The markdown report: title, environment line (with the date), command, model, table, notes."""
    environment, command, model = bc.environment_line(run["environment"]), run["command"], run["source"]
    return "\n\n".join([f"# {TITLE}", environment, f"command: `{command}`", f"model: {model}", table, *notes]) + "\n"


def save_json(out: Path, payload: dict[str, Any]) -> None:
    bc.save_json(out / f"{NAME}.json", {"benchmark": NAME, **payload})


def write_outputs(out: Path, run: dict[str, Any], rows: list[dict], grid_figure) -> None:
    """Print the table and the best-guidance line; write the markdown, the JSON and the pictures."""
    best = best_guidance(rows)
    setting = f"{run['args']['sampler']}, {run['args']['steps']} steps, {run['args']['samples']} images per cell"
    text = report(run, bc.markdown_table(rows, COLUMNS), [f"sampling: {setting}", best_guidance_line(best)])
    print("\n" + text)
    bc.save_text(out / f"{NAME}.md", text)
    save_json(out, {**run, "rows": rows, "best_guidance": best})
    bc.save_figure(plot_sweep(rows), out / f"{NAME}.png")
    bc.save_figure(grid_figure, out / f"{NAME}_grid.png")
    print(f"saved {out / f'{NAME}.json'}, {NAME}.md, {NAME}.png, {NAME}_grid.png")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = load_or_train(args, device)
    if not model.config.conditional:
        print(f"{args.checkpoint}: {UNCONDITIONAL}", file=sys.stderr)
        return 2

    out = bc.prepare_out(args.out)
    run = describe_run(args, device, argv)
    print(f"# {TITLE}\n{bc.environment_line(run['environment'])}", flush=True)
    run.update(model=model.config, source=f"{du.describe_model(model)}; {source}")
    print(f"model: {run['source']}", flush=True)

    rows = sweep(model, schedule, args, device, out, run)
    grid_figure = plot_request_grid(model, schedule, args, device)
    write_outputs(out, run, rows, grid_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
