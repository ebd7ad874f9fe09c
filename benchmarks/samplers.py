"""Samplers: how many steps do I need?

Every sampler in du.SAMPLERS (ddpm, ddim, dpm++) at each step count in --steps draws --samples unconditional
images from one trained model, all from the same starting noise (one fixed --sample-seed for every cell), and
du.evaluate_samples scores them. Each cell is timed (wall seconds, images/s; the device synced around it). The
step count is the number of network evaluations per image, so the table answers "how few evaluations give the
quality of 1000-step DDPM?", and the plot shows validity against evaluations on a log axis.

Why: sampling cost is linear in the step count, so the fewest steps that keep quality is the cheapest sampler
setting. DDPM needs many steps (it adds noise at every one), DDIM (eta = 0) is the first-order solver of the
probability-flow ODE and DPM-Solver++(2M) its second-order one (module section 10), so they should need fewer.

Where it applies: --max-steps-per-sampler skips pointless cells (default dpm++:100: a second-order solver is
expected to have converged far below 1000 steps). --spacings also runs dpm++ on other timestep grids (du.SPACINGS: time,
logsnr; du.sample's `spacing`), so the grid can be chosen by measurement; the "grid" column says which one each row
used.

After the table, a "targets" line gives, for each sampler (and grid), the fewest steps within 1 and within 3
points of DDPM-1000's validity (when 1000 is not in --steps, of the longest DDPM run, named as such). A share
measured on 512 images has a standard error of about 0.75 points at 97 % valid (2.2 at 50 %): read a 1-point
target as "about as good", not as a sharp threshold.

Writes samplers.json (rewritten after every cell), samplers.md, samplers.png (validity against network evaluations)
and samplers_10_steps.png (the first 16 samples of each sampler at 10 steps, outlined green where valid).

The table of RESULTS.md (DDPM-1000 at 512 images dominates the time; add --device cuda on a GPU):
    python benchmarks/samplers.py --checkpoint benchmarks/results/time_to_quality/recipe.pt --spacings time,logsnr \\
        --samples 512 --out benchmarks/results/samplers
Smoke test (seconds; trains a tiny model on the spot):
    python benchmarks/samplers.py --train-steps 3 --samples 8 --steps 5,10 --spacings time,logsnr --threads 1 \\
        --out /tmp/bench_smoke/samplers
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch

import diffusion_utils as du

NAME = "samplers"
TITLE = "Samplers: how many steps do I need?"
DEFAULT_STEPS = "5,10,20,50,100,1000"
DEFAULT_MAX_STEPS = "dpm++:100"
GRID_SAMPLERS = ("dpm++",)  # the samplers that --spacings runs on each grid; the others keep their registered one
GRID_PICTURE_STEPS, GRID_PICTURE_SAMPLES = 10, 16
TARGET_POINTS = (1, 3)

COLUMNS = [
    ("sampler", "sampler", ""),
    ("grid", "grid", ""),
    ("steps", "steps (network evaluations)", ""),
    ("seconds", "seconds", ".2f"),
    ("images_per_s", "images/s", ".2f"),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1 (px)", ".2f"),
    ("position_w1", "position W1 (px)", ".2f"),
]


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def parse_max_steps(text: str) -> dict[str, int]:
    """ "dpm++:100,ddim:200" -> {"dpm++": 100, "ddim": 200}; "none" -> {} (run every cell)."""
    return {} if text.strip().lower() == "none" else dict(bc.parse_samplers(text))


def parse_spacings(text: str) -> list[str]:
    """ "time,logsnr" -> ["time", "logsnr"], each one of du.SPACINGS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in du.SPACINGS]
    if not names or bad:
        choices = ", ".join(du.SPACINGS)
        raise argparse.ArgumentTypeError(f"spacings are a comma-separated list of {choices}, got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a checkpoint from diffusion_utils.py train (du.load_model: EMA weights)")
    parser.add_argument(
        "--steps",
        type=lambda text: sorted(set(bc.parse_ints(text))),
        default=[5, 10, 20, 50, 100, 1000],
        help=f"step counts, i.e. network evaluations (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--max-steps-per-sampler",
        type=parse_max_steps,
        default=parse_max_steps(DEFAULT_MAX_STEPS),
        help=f"sampler:steps caps, cells above them are skipped; none runs all (default {DEFAULT_MAX_STEPS})",
    )
    parser.add_argument(
        "--spacings",
        type=parse_spacings,
        default=None,
        help=f"timestep grids for {', '.join(GRID_SAMPLERS)} ({', '.join(du.SPACINGS)}; default: the registered one)",
    )
    parser.add_argument("--samples", type=bc.positive_int, default=512, help="images per cell (default 512)")
    parser.add_argument("--sample-seed", type=int, default=1234, help="sampling seed, the same for every cell")
    parser.add_argument("--chunk", type=bc.positive_int, default=256, help="images per du.sample chunk (default 256)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Cells: which to run, and running one
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    sampler: str
    grid: str
    steps: int
    label: str  # sampler, plus the grid where the sampler runs on more than one


def plan_cells(args: argparse.Namespace, schedule: du.NoiseSchedule) -> tuple[list[Cell], list[dict[str, Any]]]:
    """(the cells to run, the skipped ones with the reason), sampler by sampler, grid by grid, steps ascending."""
    cells, skipped = [], []
    for name, sampler in du.SAMPLERS.items():
        grids = args.spacings if name in GRID_SAMPLERS and args.spacings else [sampler.spacing]
        for grid in grids:
            label = f"{name} ({grid})" if len(grids) > 1 else name
            for steps in args.steps:
                reason = skip_reason(name, steps, args.max_steps_per_sampler, schedule)
                if reason:
                    skipped.append({"sampler": name, "grid": grid, "steps": steps, "reason": reason})
                else:
                    cells.append(Cell(name, grid, steps, label))
    return cells, skipped


def skip_reason(name: str, steps: int, caps: dict[str, int], schedule: du.NoiseSchedule) -> str | None:
    if name in caps and steps > caps[name]:
        return f"above --max-steps-per-sampler {name}:{caps[name]}"
    if steps > len(schedule):
        return f"more steps than the model's {len(schedule)} timesteps"
    return None


def run_cell(model, schedule, cell: Cell, args: argparse.Namespace, device) -> tuple[dict[str, Any], Any]:
    """(the cell's row: timing and du.evaluate_samples's scores, the images)."""
    scores, images = bc.sample_and_evaluate(
        model,
        schedule,
        args.samples,
        cell.sampler,
        cell.steps,
        device,
        seed=args.sample_seed,
        batch_size=args.chunk,
        spacing=cell.grid,
    )
    seconds = scores.pop("sample_seconds")
    return {**dataclasses.asdict(cell), "seconds": seconds, **scores}, images


def warm_up(model, schedule, args: argparse.Namespace) -> None:
    """First-call allocations and kernel choices, outside the timings."""
    du.sample(model, schedule, min(args.samples, args.chunk), steps=2, sampler="ddim", seed=0, progress=False)


# ------------------------------------------------------------------------------------------
# Targets: the fewest steps within a few points of DDPM-1000
# ------------------------------------------------------------------------------------------


def reference_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """DDPM at 1000 steps, or else the DDPM row with the most steps (None without DDPM rows)."""
    ddpm = [r for r in rows if r["sampler"] == "ddpm"]
    return max(ddpm, key=lambda r: r["steps"]) if ddpm else None


def fewest_steps(ordered: list[dict[str, Any]], floor: float) -> int | None:
    """The first row's steps whose validity reaches floor (1e-9 of slack for the float subtraction), or None."""
    return next((r["steps"] for r in ordered if r["valid"] >= floor - 1e-9), None)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For each sampler label, the fewest steps whose validity is within 1 (and 3) points of the reference's."""
    reference = reference_row(rows)
    if reference is None:
        return {"reference": None, "fewest_steps": {}}
    fewest: dict[str, dict[str, int | None]] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        ordered = sorted((r for r in rows if r["label"] == label), key=lambda r: r["steps"])
        fewest[label] = {
            str(points): fewest_steps(ordered, reference["valid"] - points / 100) for points in TARGET_POINTS
        }
    share, n = reference["valid"], reference["n"]
    about = {"steps": reference["steps"], "valid": share, "standard_error": (share * (1 - share) / n) ** 0.5}
    return {"reference": about, "fewest_steps": fewest}


def targets_line(result: dict[str, Any]) -> str:
    reference = result["reference"]
    if reference is None:
        return "targets: no DDPM row to compare with"
    name = f"DDPM-{reference['steps']}" + ("" if reference["steps"] == 1000 else ", as DDPM-1000 was not run")
    head = f"{name}: {100 * reference['valid']:.1f}% valid ± {100 * reference['standard_error']:.1f} (standard error)"
    parts = []
    for points in TARGET_POINTS:
        found = ", ".join(
            f"{label} {steps if steps is not None else 'not reached'}"
            for label, by_points in result["fewest_steps"].items()
            for steps in [by_points[str(points)]]
        )
        parts.append(f"Within {points} point{'s' if points > 1 else ''}: {found}")
    return f"targets, the fewest steps against {head}. " + ". ".join(parts) + "."


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------


def measure(model, schedule, cells: list[Cell], args: argparse.Namespace, device, env: dict, skipped: list):
    """(a row per cell, {label: the 10-step images}); the JSON is rewritten after every cell. A cell that du.sample
    refuses (e.g. a log-SNR grid that cannot hold that many distinct timesteps) joins `skipped`."""
    warm_up(model, schedule, args)
    rows, pictures = [], {}
    for cell in cells:
        try:
            row, images = run_cell(model, schedule, cell, args, device)
        except ValueError as error:
            skipped.append({"sampler": cell.sampler, "grid": cell.grid, "steps": cell.steps, "reason": str(error)})
            print(f"skipped {cell.label} at {cell.steps} steps: {error}", flush=True)
            continue
        rows.append(row)
        if cell.steps == GRID_PICTURE_STEPS:
            pictures[cell.label] = images
        print(f"{cell.label} {cell.steps} steps: {row['seconds']:.2f} s, {100 * row['valid']:.1f}% valid", flush=True)
        bc.save_json(Path(args.out) / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    return rows, pictures


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


def figures(rows: list[dict[str, Any]], pictures: dict[str, Any]) -> dict[str, Any]:
    """{file name: figure}: the validity plot, and the 10-step samples, one row per sampler (when 10 steps was run)."""
    points = [{"sampler": r["label"], "steps": r["steps"], "valid": r["valid"]} for r in rows]
    figure = du.plot_validity_against_evaluations(points, title="Validity against network evaluations (log)")
    found = {f"{NAME}.png": figure}
    if pictures:
        images = torch.cat([batch[:GRID_PICTURE_SAMPLES] for batch in pictures.values()])
        titles = [
            label if k == 0 else ""
            for label, batch in pictures.items()
            for k in range(min(len(batch), GRID_PICTURE_SAMPLES))
        ]
        columns = min(GRID_PICTURE_SAMPLES, max(len(batch) for batch in pictures.values()))
        title = f"First {GRID_PICTURE_SAMPLES} samples at {GRID_PICTURE_STEPS} steps (green: valid)"
        grid = du.plot_grid(images, titles, columns=columns, title=title, outline=du.outline_valid(images))
        found[f"{NAME}_{GRID_PICTURE_STEPS}_steps.png"] = grid
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    model, schedule, source = bc.load_or_train(args, device)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    cells, skipped = plan_cells(args, schedule)
    for cell in skipped:
        print(f"skipped {cell['sampler']} ({cell['grid']}) at {cell['steps']} steps: {cell['reason']}", flush=True)
    rows, pictures = measure(model, schedule, cells, args, device, env, skipped)
    found = targets(rows)
    sections = [f"model: {source}", bc.markdown_table(rows, COLUMNS), targets_line(found)]
    bc.write_report(out, NAME, TITLE, env, sections, model=model.config, rows=rows, skipped=skipped, targets=found)
    for file, figure in figures(rows, pictures).items():
        du.save_figure(figure, out / file, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
