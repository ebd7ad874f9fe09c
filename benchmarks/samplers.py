"""Samplers: how many steps do I need? (RESULTS.md, "Samplers: how many steps do I need?")

Every sampler in du.SAMPLERS at each step count draws --samples unconditional images from one model and the same
starting noise, timed and scored by du.evaluate_samples; --spacings also runs dpm++ (to 100 steps) on other grids.
Sampling cost is linear in the steps, so the fewest steps that keep quality is the cheapest setting.

RESULTS.md gives the command of its table (add --device cuda on a GPU). Smoke test (seconds; a tiny model):
    python benchmarks/samplers.py --train-steps 3 --samples 8 --steps 5,10 --spacings time,logsnr --threads 1 \\
        --out /tmp/bench_smoke/samplers
"""

from __future__ import annotations

import argparse
import sys

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch

import diffusion_utils as du

NAME = "samplers"
MAX_STEPS = {"dpm++": 100}  # a second-order solver has converged far below 1000 steps
GRID_SAMPLERS = ("dpm++",)  # the samplers --spacings runs on each grid; the others keep their registered one
PICTURE_STEPS, PICTURE_SAMPLES = 10, 16
COLUMNS = bc.columns(
    "sampler; grid; steps|steps (network evaluations); seconds||.2f; images_per_s|images/s|.2f; valid||%",
    "mid_gray|mid-gray|%; circle_share||.2f; size_w1|size W1 (px)|.2f; position_w1|position W1 (px)|.2f",
)


def parse_spacings(text: str) -> list[str]:
    """ "time,logsnr" -> ["time", "logsnr"], each one of du.SPACINGS."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or any(name not in du.SPACINGS for name in names):
        raise argparse.ArgumentTypeError(f"spacings are a comma-separated list of {', '.join(du.SPACINGS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a checkpoint from diffusion_utils.py train (du.load_model: EMA weights)")
    steps_help = "step counts, i.e. network evaluations (default 5,10,20,50,100,1000)"
    parser.add_argument("--steps", type=bc.parse_ints, default=[5, 10, 20, 50, 100, 1000], help=steps_help)
    parser.add_argument("--spacings", type=parse_spacings, help="dpm++'s timestep grids (default: its own)")
    parser.add_argument("--samples", type=bc.positive_int, default=512, help="images per cell (default 512)")
    args = parser.parse_args(argv)
    args.steps = sorted(set(args.steps))
    return args


def plan_cells(args: argparse.Namespace, schedule: du.NoiseSchedule) -> list[tuple[str, str, int]]:
    """(sampler, grid, steps) of every cell to run, sampler by sampler, grid by grid, steps ascending."""
    cells = []
    for name, sampler in du.SAMPLERS.items():
        grids = args.spacings if name in GRID_SAMPLERS and args.spacings else [sampler.spacing]
        limit = min(MAX_STEPS.get(name, len(schedule)), len(schedule))
        cells += [(name, grid, steps) for grid in grids for steps in args.steps if steps <= limit]
    return cells


def measure(model, schedule, args: argparse.Namespace, device, env: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(a row per cell, {label: the 10-step images}); the JSON is rewritten after every cell. A cell du.sample
    refuses (a log-SNR grid that cannot hold that many distinct timesteps) is skipped."""
    du.sample(model, schedule, min(args.samples, 256), steps=2, sampler="ddim", progress=False)  # warm-up, untimed
    rows, pictures = [], {}
    for sampler, grid, steps in plan_cells(args, schedule):
        label = f"{sampler} ({grid})" if sampler in GRID_SAMPLERS and len(args.spacings or []) > 1 else sampler
        try:
            scores, images = bc.sample_and_evaluate(model, schedule, args.samples, sampler, steps, device, spacing=grid)
        except ValueError as error:
            print(f"skipped {label} at {steps} steps: {error}", flush=True)
            continue
        rows.append({"sampler": sampler, "grid": grid, "label": label, "seconds": scores.pop("sample_seconds")})
        rows[-1] |= scores
        if steps == PICTURE_STEPS:
            pictures[label] = images[:PICTURE_SAMPLES]
        print(f"{label} {steps} steps: {rows[-1]['seconds']:.2f} s, {100 * rows[-1]['valid']:.1f}% valid", flush=True)
        bc.save_json(args.out / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    return rows, pictures


def save_figures(out, rows: list[dict], pictures: dict[str, torch.Tensor]) -> None:
    """Validity against network evaluations, and the first 10-step samples, one row per sampler."""
    points = [{"sampler": r["label"], "steps": r["steps"], "valid": r["valid"]} for r in rows]
    figure = du.plot_validity_against_evaluations(points, title="Validity against network evaluations (log)")
    du.save_figure(figure, out / f"{NAME}.png", dpi=110)
    if not pictures:
        return
    images = torch.cat(list(pictures.values()))
    titles = [label if k == 0 else "" for label, batch in pictures.items() for k in range(len(batch))]
    columns = max(len(batch) for batch in pictures.values())
    title = f"First {PICTURE_SAMPLES} samples at {PICTURE_STEPS} steps (green: valid)"
    grid = du.plot_grid(images, titles, columns=columns, title=title, outline=du.outline_valid(images))
    du.save_figure(grid, out / f"{NAME}_{PICTURE_STEPS}_steps.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    model, schedule, source = bc.load_or_train(args, device)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    rows, pictures = measure(model, schedule, args, device, env)
    sections = [f"model: {source}", bc.markdown_table(rows, COLUMNS)]
    bc.write_report(args.out, NAME, "Samplers: how many steps do I need?", env, sections, model=model.config, rows=rows)
    save_figures(args.out, rows, pictures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
