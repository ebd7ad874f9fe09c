"""Time to quality: how good are the samples after N minutes of training? (RESULTS.md, "Time to quality", the
ablation chain of "What each lever buys" and "On a GPU")

Each configuration trains on fresh shapes for a wall-clock budget; at each evaluation the clock pauses and its EMA
model draws --samples images with DDPM-100 (the original design: 64 at DDPM-1000), scored by du.evaluate_samples.
A conditional configuration also gets an "NAME, asked" row: the class, centre and size of as many real shapes.
  --budgets 5,15   a fresh run per budget: needed when the lr decays to 0 at the end of each train() call
  --eval-at 5,15   one run of --minutes, evaluated between chunks (a constant lr only)
Configurations: original, previous (bc.previous_recipe), recipe (du.default_configs(device, "diffusion")) and,
with --ablation, the cumulative chain from the original to the CPU recipe (+cosine, +v, ...). Writes
time_to_quality.json and .md (a row per seed, then mean and min-max), valid_vs_minutes.png, sample grids and each
configuration's checkpoint.

The commands of RESULTS.md are given there. Smoke test (seconds):
    python benchmarks/time_to_quality.py --configs previous,recipe --budgets 0.03,0.05 --seeds 0,1 --samples 8 \\
        --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1 --out /tmp/bench_smoke/ttq
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from functools import partial

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import numpy as np

import diffusion_utils as du

REQUEST_SEED = 4321  # the real shapes whose class, centre and size conditional configurations are asked for
ROW_COLUMNS = bc.columns(
    "config; seed; minutes||g; train_minutes|minutes trained|.2f; images_seen; sampler; steps; n; valid||%",
    "mid_gray|mid-gray|%; circle_share||.2f; size_w1|size W1 (px)|.2f; position_w1|position W1 (px)|.2f",
    "matches|asked: matches|%; class_accuracy|asked: class right|%; center_error|asked: centre error (px)|.2f",
    "size_error|asked: size error (px)|.2f; loss|loss (last 50)|.4f",
)
SUMMARY_COLUMNS = bc.columns(
    "config; minutes||g; seeds; images_seen_mean|images seen (mean)|,.0f; valid_mean|valid (mean)|%",
    "valid_spread|valid (min – max); mid_gray_mean|mid-gray (mean)|%; mid_gray_spread|mid-gray (min – max)",
    "circle_share_mean|circle share (mean)|.2f; size_w1_mean|size W1 (mean)|.2f",
    "position_w1_mean|position W1 (mean)|.2f; matches_mean|asked: matches (mean)|%",
    "center_error_mean|asked: centre error (mean)|.2f; size_error_mean|asked: size error (mean)|.2f",
)
SUMMARY_METRICS = ("images_seen", "valid", "mid_gray", "circle_share", "size_w1", "position_w1")
SUMMARY_METRICS += ("matches", "center_error", "size_error")


@dataclass
class Preset:
    name: str
    model: du.ModelConfig
    train: du.TrainConfig
    evaluations: list[tuple[str, int, int]]  # (row label, DDPM steps, samples)


def ablation_chain(original, target) -> list[tuple[str, du.ModelConfig, du.TrainConfig]]:
    """The original design plus one change of the target recipe at a time, leaving out steps that change nothing."""
    (model, train), (target_model, t) = original, target
    steps = [
        ("+cosine", {"schedule": target_model.schedule}, {}),
        ("+v", {"prediction": target_model.prediction}, {}),
        ("+min-snr-5", {}, {"min_snr_gamma": t.min_snr_gamma, "min_snr_form": "paper"}),
        ("+time-every-block", {"time_injection": target_model.time_injection}, {}),
        ("+ema", {}, {"ema_decay": t.ema_decay}),
        ("+attention", {"bottleneck_attention": target_model.bottleneck_attention}, {}),
        ("+min-snr-cap", {}, {"min_snr_form": t.min_snr_form}),
        ("+lr-decay", {}, {"lr_schedule": t.lr_schedule}),
        ("+conditioning", {"conditional": target_model.conditional}, {"condition_dropout": t.condition_dropout}),
    ]
    chain = []
    for name, model_changes, train_changes in steps:
        changed = dataclasses.replace(model, **model_changes), dataclasses.replace(train, **train_changes)
        if changed != (model, train):
            model, train = changed
            chain.append((name, model, train))
    if (model, train) != target:
        raise RuntimeError("the ablation chain no longer ends at the CPU diffusion recipe: update its steps")
    return chain


def build_presets(args, device) -> dict[str, Preset]:
    """Every named configuration, with the command line's overrides applied."""
    short = [("{}", du.DEFAULT_STEPS, args.samples)]
    original = du.original_design_configs()
    original_evaluations = [("original", 1000, 64)]  # DDPM-1000 is slow: 64 images
    if args.ablation:  # the sampler alone first, so every later step is scored with DDPM-100
        original_evaluations.append(("+100-step sampling", du.DEFAULT_STEPS, args.samples))
    raw = {
        "original": (*original, original_evaluations),
        "previous": (*bc.previous_recipe(device), short),
        "recipe": (*du.default_configs(device, "diffusion"), short),
    }
    chain = ablation_chain(original, du.default_configs("cpu", "diffusion"))
    raw |= {name: (model, train, short) for name, model, train in chain}
    presets = {}
    for name, (model, train, evaluations) in raw.items():
        evaluations = [(label.format(name), steps, n) for label, steps, n in evaluations]
        presets[name] = Preset(name, *bc.apply_overrides(model, train, args), evaluations)
    return presets


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/time_to_quality")
    add = parser.add_argument
    add("--budgets", type=bc.parse_floats, help="minutes: a fresh run per configuration, seed and budget")
    add("--eval-at", type=bc.parse_floats, help="minutes: evaluation points of one chunked run of --minutes")
    add("--minutes", type=float, default=15.0, help="--eval-at's run, or the one budget without either (default 15)")
    add("--seeds", type=bc.parse_ints, help="training seeds, each a run per configuration (default: --seed)")
    add("--configs", help="comma-separated configurations, in order (default original,recipe, or the ablation)")
    add("--ablation", action="store_true", help="the cumulative chain from the original design to the recipe")
    add("--samples", type=int, default=256, help="images per evaluation with 100-step sampling (default 256)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)
    if args.budgets and args.eval_at:
        parser.error("give --budgets (a fresh run per budget) or --eval-at (one chunked run), not both")
    if args.eval_at and (max(args.eval_at) > args.minutes + 1e-9 or min(args.eval_at) <= 0):
        parser.error(f"--eval-at points must lie in (0, --minutes={args.minutes}]")
    args.seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    args.points = sorted(set(args.eval_at or args.budgets or [args.minutes]))
    return args, parser


def chosen_names(args, presets: dict[str, Preset], parser) -> list[str]:
    """The configurations asked for, or a parser error saying what does not fit."""
    if args.configs:
        names = args.configs.split(",")
    elif args.ablation:
        names = ["original"] + [name for name in presets if name.startswith("+")]
    else:
        names = ["original", "recipe"]
    unknown = [n for n in names if n not in presets]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(presets)}")
    decaying = [n for n in names if presets[n].train.lr_schedule != "constant"]
    if args.eval_at and len(args.points) > 1 and decaying:
        parser.error(f"{', '.join(decaying)} decay(s) the lr over each train() call: use --budgets, not --eval-at")
    return names


def run_preset(preset: Preset, args, device, rows: list[dict], save) -> None:
    """Every seed of one configuration: a fresh run per budget, or one chunked run evaluated at each point."""
    for seed in args.seeds:
        train = dataclasses.replace(preset.train, seed=seed)
        trainer, seconds = None, 0.0
        for point in args.points:
            if trainer is None or not args.eval_at:
                trainer, seconds = du.Trainer(preset.model, train, device=device), 0.0
                print(f"\n## {preset.name}, seed {seed}: {du.describe_model(trainer.model)}", flush=True)
            if point > seconds / 60:  # train up to the point; the clock pauses while evaluating
                seconds += bc.timed(partial(trainer.train, minutes=point - seconds / 60, progress=False), device)[1]
            common = {"seed": seed, "minutes": point, "train_minutes": seconds / 60, "steps_trained": trainer.step}
            common |= {"images_seen": trainer.images_seen, "loss": bc.mean_tail(trainer.losses)}
            grids = args.out if point == args.points[-1] and seed == args.seeds[0] else None  # one grid per config
            for row in evaluate(trainer, preset, grids):
                rows.append({"config": row.pop("config"), **common, **row})
                print(bc.markdown_table([rows[-1]], ROW_COLUMNS).splitlines()[-1], flush=True)
                save()
        suffix = "" if seed == args.seeds[0] else f"_seed{seed}"
        du.save_checkpoint(args.out / f"{slug(preset.name)}{suffix}.pt", trainer)


def evaluate(trainer: du.Trainer, preset: Preset, grids) -> list[dict]:
    """Each evaluation's scores, then (conditional configurations) the scores asked for real shapes."""
    model, schedule, rows = trainer.sampling_model, trainer.schedule, []
    for label, steps, n in preset.evaluations:
        metrics, images = bc.sample_and_evaluate(model, schedule, n, "ddpm", steps, trainer.device)
        rows.append({"config": label, **metrics})
        save_grid(grids, label, images, f"{trainer.images_seen} images seen, ddpm {steps} steps", metrics)
    if preset.model.conditional:  # with the last evaluation's steps and sample count
        condition = du.make_shapes(n, seed=REQUEST_SEED).condition()
        options = {"condition": condition, "guidance": du.DEFAULT_GUIDANCE}
        _, images = bc.sample_and_evaluate(model, schedule, n, "ddpm", steps, trainer.device, **options)
        metrics = {"sampler": "ddpm", "steps": steps, **du.evaluate_requests(images, condition)}
        rows.append({"config": f"{label}, asked", **metrics})
        outline = du.request_matches(images[:32], condition.select(slice(0, 32)))
        save_grid(grids, f"{label}, asked", images, "asked for real shapes", metrics, outline)
    return rows


def save_grid(folder, label: str, images, what: str, metrics: dict, outline=None) -> None:
    if folder is not None:
        score = f"matches {100 * metrics['matches']:.0f}%" if "matches" in metrics else f"valid {metrics['valid']:.0%}"
        figure = du.plot_grid(images[:32], title=f"{label}: {what}, {score}", outline=outline)
        du.save_figure(figure, folder / f"samples_{slug(label)}.png")


def slug(label: str) -> str:
    """A file-name stem: "+min-snr-5" -> "min_snr_5", "recipe, asked" -> "recipe_asked"."""
    return "_".join("".join(c if c.isalnum() else " " for c in label).split()) or "config"


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration and point: the number of seeds, and each metric's mean, min and max over them."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["minutes"]), []).append(row)
    summary = []
    for (config, minutes), group in groups.items():
        entry: dict = {"config": config, "minutes": minutes, "seeds": len(group)}
        for key in SUMMARY_METRICS:
            values = [r[key] for r in group if r.get(key) is not None and not math.isnan(r[key])]
            if values:
                entry |= {f"{key}_mean": float(np.mean(values)), f"{key}_min": min(values), f"{key}_max": max(values)}
        for key in ("valid", "mid_gray"):
            if f"{key}_min" in entry:
                low, high = (bc.format_value(entry[f"{key}_{end}"], "%") for end in ("min", "max"))
                entry[f"{key}_spread"] = low if low == high else f"{low} – {high}"
        summary.append(entry)
    return summary


def plot_quality(summary: list[dict], rows: list[dict], seeds: list[int], device_name: str):
    """Valid and mid-gray shares against minutes: each configuration's mean, min-max band and per-seed points."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    configs = list(dict.fromkeys(e["config"] for e in summary if "mid_gray_mean" in e))  # not the "asked" rows
    for ax, key, ylabel in zip(axes, ("valid", "mid_gray"), ("valid shapes", "mid-gray pixels")):
        for k, config in enumerate(configs):
            entries = sorted((e for e in summary if e["config"] == config), key=lambda e: e["minutes"])
            xs = [e["minutes"] for e in entries]
            ax.plot(xs, [e[f"{key}_mean"] for e in entries], "o-", ms=3, color=f"C{k % 10}", label=config)
            if len(seeds) > 1:
                band = [e[f"{key}_min"] for e in entries], [e[f"{key}_max"] for e in entries]
                ax.fill_between(xs, *band, color=f"C{k % 10}", alpha=0.2, lw=0)
                points = [(r["minutes"], r[key]) for r in rows if r["config"] == config]
                ax.plot(*zip(*points), ".", color=f"C{k % 10}", alpha=0.5)
        ax.set(xlabel="minutes of training", ylabel=ylabel)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, None)
    spread = f"mean of {len(seeds)} seeds, band min-max" if len(seeds) > 1 else f"seed {seeds[0]}"
    fig.suptitle(f"Time to quality on {device_name} ({spread}; evaluation excluded)")
    return fig


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    device = bc.setup(args)
    presets = build_presets(args, device)
    names = chosen_names(args, presets, parser)
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    mode = "eval_at" if args.eval_at else "budgets"
    print(f"# Time to quality\n{bc.environment_line(env)}\n{mode} {args.points} min; seeds {args.seeds}", flush=True)
    rows: list[dict] = []
    payload = {"mode": mode, "points_minutes": args.points, "seeds": args.seeds, "rows": rows}
    payload["presets"] = {n: {"model": presets[n].model, "train": presets[n].train} for n in names}
    json_path = args.out / "time_to_quality.json"

    def save() -> None:
        bc.save_json(json_path, {"benchmark": "time_to_quality", "environment": env, "args": vars(args), **payload})

    for name in names:
        run_preset(presets[name], args, device, rows, save)
    payload["summary"] = summary = summarize(rows)
    sections = [
        "## Results, one row per seed\n\n" + bc.markdown_table(rows, ROW_COLUMNS),
        "## Mean and spread over seeds\n\n" + bc.markdown_table(summary, SUMMARY_COLUMNS),
    ]
    bc.write_report(args.out, "time_to_quality", "Time to quality", env, sections, args=vars(args), **payload)
    du.save_figure(plot_quality(summary, rows, args.seeds, env["device_name"]), args.out / "valid_vs_minutes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
