"""Diffusion or flow matching? The recipe against rectified flow on the same network (RESULTS.md, "Diffusion or
flow matching").

Phase "train" runs jobs CONFIG:SEED:STEPS, each a fresh run told its budget in optimiser steps (the two objectives
cost the same per step, so steps stand for minutes: 5,100 and 16,100 steps are the recipe's 5 and 15 minutes on the
2-core CPU in "Time to quality"), scored on --samples images with DDPM at 100 steps, unconditionally; the largest
budget's checkpoint is kept. Phase "samplers" loads those checkpoints and scores every sampler at each number of
network evaluations per image, and the 1000-step references. Phase "report" joins the rows of --out folders.
Step budgets make the rows independent of the machine's speed, so jobs may run in parallel (one thread each).

Configurations (`configs`, each commented there): the recipe, the flow at logit-normal, uniform or shifted times, and
flows reading prompts, among them flow-shifted-prompt-rotary-2head: du.default_configs(device, "flow", "prompt"). A
prompt model's unconditional score is the empty prompt's; benchmarks/prompts.py scores its prompts.
Smoke test (seconds):
    python benchmarks/flow_vs_diffusion.py train --jobs recipe:0:3,flow:0:3 --samples 8 --threads 1 \\
        --base-channels 8 --channel-mults 1,2 --batch-size 8 --out /tmp/fvd_smoke
    python benchmarks/flow_vs_diffusion.py samplers --evaluations 1,2 --reference 4 --samples 8 --out /tmp/fvd_smoke
    python benchmarks/flow_vs_diffusion.py report --out /tmp/fvd_smoke
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too

import diffusion_utils as du

SCORE_COLUMNS = [("valid", "valid", "%"), ("mid_gray", "mid-gray", "%"), ("circle_share", "circle share", ".2f")]
SCORE_COLUMNS += [("size_w1", "size W1 (px)", ".2f"), ("position_w1", "position W1 (px)", ".2f")]
TRAIN_COLUMNS = [("config", "config", ""), ("seed", "seed", ""), ("steps_trained", "steps", ",")]
TRAIN_COLUMNS += [("images_per_s", "train images/s", ".0f"), *SCORE_COLUMNS]
SAMPLER_COLUMNS = [
    ("config", "checkpoint", ""),
    ("sampler", "sampler", ""),
    ("steps", "evaluations", ""),
    ("spacing", "grid", ""),
    ("clip", "x0 clip", ""),
    *SCORE_COLUMNS,
    ("sample_seconds", "seconds", ".1f"),
]


def configs(device, args) -> dict[str, tuple[du.ModelConfig, du.TrainConfig]]:
    recipe, (flow_model, uniform) = du.default_configs(device, "diffusion"), du.default_configs(device, "flow")
    flow = (flow_model, dataclasses.replace(uniform, time_sampling="logit-normal"))  # SD3's times, as first measured
    learned = {"conditioning": "prompt", "text_positions": "learned"}  # the first text encoder's word order
    prompt = dataclasses.replace(flow_model, **learned, cross_attention_levels=None, query_positions=False)
    coarsest = dataclasses.replace(prompt, cross_attention_levels=1)  # cross-attention at the coarsest level only
    recipe_prompt = du.default_configs(device, "diffusion", "prompt")
    recipe_model, shifted = du.default_configs(device, "flow", "prompt")  # the prompt recipe: shifted t, 2 heads
    four = dataclasses.replace(recipe_model, attention_heads=4)  # four heads: the rotary, learned and lean rows
    recipe_learned = dataclasses.replace(four, **learned)
    lean = dataclasses.replace(four, text_layers=1, cross_attention_levels=0)  # 1 text layer, bottleneck only
    found = {
        "recipe": recipe,
        "recipe-prompt-shifted": recipe_prompt,  # the notebook's model: DDPM reading prompts, at shifted timesteps
        "recipe-prompt-uniform": (recipe_prompt[0], dataclasses.replace(recipe_prompt[1], time_sampling="uniform")),
        "flow": flow,
        "flow-uniform": (flow_model, uniform),
        "flow-prompt": (prompt, flow[1]),  # logit-normal t, cross-attention at every level, learned text positions
        "flow-prompt-l1": (coarsest, flow[1]),
        "flow-prompt-l1-positions": (dataclasses.replace(coarsest, query_positions=True), flow[1]),
        "flow-uniform-prompt-l1": (coarsest, uniform),
        "flow-uniform-prompt-l1-positions": (dataclasses.replace(coarsest, query_positions=True), uniform),
        # shifted t (towards the noise), learned text positions, rotary ones, cheaper networks (4 heads), the recipe
        "flow-shifted-prompt-l1": (dataclasses.replace(recipe_learned, query_positions=False), shifted),
        "flow-shifted-prompt-l1-positions": (recipe_learned, shifted),
        "flow-shifted-prompt-rotary": (four, shifted),
        "flow-shifted-prompt-rotary-1layer-mid": (lean, shifted),
        "flow-shifted-prompt-rotary-mid-32": (dataclasses.replace(lean, text_layers=2, text_width=32), shifted),
        "flow-shifted-prompt-rotary-2head": (recipe_model, shifted),
        "flow-shifted-prompt-rotary-1head": (dataclasses.replace(recipe_model, attention_heads=1), shifted),
    }
    return {name: bc.apply_overrides(model, train, args) for name, (model, train) in found.items()}


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/flow_vs_diffusion")
    parser.add_argument("phase", choices=("train", "samplers", "report"))
    parser.add_argument("--jobs", help="train: CONFIG:SEED:STEPS,... run in this order")
    parser.add_argument("--samples", type=int, default=512, help="images per score (default 512)")
    parser.add_argument("--evaluations", type=bc.parse_ints, default=[1, 2, 4, 10, 20, 50])
    parser.add_argument("--reference", type=int, default=1000, help="evaluations of the reference rows (ddpm, ddim)")
    parser.add_argument("--checkpoints", help="samplers: comma-separated checkpoints (default: --out's *_seed*.pt)")
    parser.add_argument("--diagnose", action="store_true", help="samplers: also the grids, clip rules and switches")
    parser.add_argument("--folders", help="report: comma-separated --out folders whose rows to join (default --out)")
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def append_row(out: Path, name: str, row: dict) -> None:
    """One JSON line per result, written as it comes: a long run that stops keeps what it measured."""
    with open(out / f"{name}.jsonl", "a") as file:
        file.write(json.dumps(du.to_json(row)) + "\n")
    print(bc.markdown_table([row], TRAIN_COLUMNS if name == "train" else SAMPLER_COLUMNS).splitlines()[-1], flush=True)


def train_phase(args, device, out: Path) -> None:
    found = configs(device, args)
    jobs = [(name, int(seed), int(steps)) for name, seed, steps in (job.split(":") for job in args.jobs.split(","))]
    largest = {(name, seed): max(s for n, sd, s in jobs if (n, sd) == (name, seed)) for name, seed, _ in jobs}
    for name, seed, steps in jobs:
        model, train = found[name]
        trainer = du.Trainer(model, dataclasses.replace(train, seed=seed), device=device)
        start = time.perf_counter()
        trainer.train(steps=steps, progress=False)
        seconds = time.perf_counter() - start
        scores, _ = bc.sample_and_evaluate(trainer.sampling_model, trainer.schedule, args.samples, "ddpm", 100, device)
        row = {"config": name, "seed": seed, "steps_trained": steps, "train_seconds": seconds}
        append_row(out, "train", {**row, "images_per_s": trainer.images_seen / seconds, **scores})
        if steps == largest[(name, seed)]:
            du.save_checkpoint(out / f"{name}_seed{seed}.pt", trainer)


def samplers_phase(args, device, out: Path) -> None:
    paths = [Path(p) for p in args.checkpoints.split(",")] if args.checkpoints else sorted(out.glob("*_seed*.pt"))
    for path in paths:
        model, schedule = du.load_model(path, device=device)
        for sampler, evaluations, options in sampler_cells(args):
            scores, _ = bc.sample_and_evaluate(model, schedule, args.samples, sampler, evaluations, device, **options)
            row = {"config": path.stem, "spacing": options.get("spacing", du.SAMPLERS[sampler].spacing)}
            append_row(out, "samplers", {**row, "clip": options.get("clip_x0", "clip"), **scores})


def sampler_cells(args) -> list[tuple[str, int, dict]]:
    """The four standard samplers at each evaluation count on the plain grids (time; log-SNR for dpm++ and heun), and
    the references; with --diagnose, where the deterministic samplers lose validity: the trailing grids at few steps,
    other x0 clip rules, and DDPM switched to DDIM (or the reverse) at a share of a 100-step run."""
    plain = {"ddpm": "time", "ddim": "time", "dpm++": "logsnr", "heun": "logsnr"}
    cells = [(sampler, e, {"spacing": grid}) for sampler, grid in plain.items() for e in args.evaluations]
    cells += [(sampler, args.reference, {"spacing": "time"}) for sampler in ("ddpm", "ddim")]
    if args.diagnose:
        for sampler in ("ddim", "dpm++", "heun"):
            cells += [(sampler, e, {"spacing": f"{plain[sampler]}-trailing"}) for e in (2, 4, 10)]
        rules = ("dynamic", "last", "none")
        cells += [(s, 10, {"spacing": plain[s], "clip_x0": rule}) for s in ("ddim", "dpm++") for rule in rules]
        cells += [(register_switch(first, then, share), 100, {}) for first, then in SWITCHES for share in SHARES]
    return cells


SWITCHES, SHARES = (("ddpm", "ddim"), ("ddim", "ddpm")), (0.25, 0.5, 0.75)


def register_switch(first: str, then: str, share: float) -> str:
    """A sampler that takes `first`'s steps over the noisiest `share` of the grid and `then`'s over the rest."""
    name = f"{first}>{then}@{share:g}"

    def step(schedule, i, x_t, denoise, state):
        noisy = i >= round((1 - share) * len(schedule))
        return du.SAMPLERS[first if noisy else then].step(schedule, i, x_t, denoise, state)

    du.register_sampler(name)(step)
    return name


def read_rows(folders: list[Path], name: str) -> list[dict]:
    rows = []
    for folder in folders:
        if (folder / f"{name}.jsonl").exists():
            rows += [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    return rows


def report_phase(args, device, out: Path) -> None:
    folders = [Path(f) for f in args.folders.split(",")] if args.folders else [out]
    order = list(configs(device, args))
    trained = sorted(read_rows(folders, "train"), key=lambda r: (order.index(r["config"]), r["steps_trained"]))
    sampled = read_rows(folders, "samplers")
    plain = [r for r in sampled if is_plain(r)]
    sections = ["## Training, one row per run (DDPM-100)\n\n" + bc.markdown_table(trained, TRAIN_COLUMNS)]
    sections.append("## Samplers on the 15-minute checkpoints\n\n" + bc.markdown_table(plain, SAMPLER_COLUMNS))
    others = [r for r in sampled if not is_plain(r)]
    sections.append("## Diagnosis: grids, clip rules, switches\n\n" + bc.markdown_table(others, SAMPLER_COLUMNS))
    env = bc.environment(device, __file__)
    bc.write_report(
        out, "flow_vs_diffusion", "Diffusion or flow matching", env, sections, train=trained, samplers=sampled
    )
    for checkpoint in dict.fromkeys(r["config"] for r in plain):
        rows = [r for r in plain if r["config"] == checkpoint and r["steps"] in args.evaluations]
        figure = du.plot_validity_against_evaluations(rows, title=f"{checkpoint}: validity against evaluations")
        du.save_figure(figure, out / f"samplers_{checkpoint}.png")


def is_plain(row: dict) -> bool:
    """A cell of the sweep (a standard sampler on the plain time or log-SNR grid, x0 clipped every step), not one of
    the diagnosis (trailing grids, other clip rules, switches)."""
    standard = row["sampler"] in ("ddpm", "ddim", "dpm++", "heun")
    return standard and row["spacing"] in ("time", "logsnr") and row["clip"] == "clip"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    out = bc.prepare_out(args.out)
    {"train": train_phase, "samplers": samplers_phase, "report": report_phase}[args.phase](args, device, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
