"""Time to quality: how fast does each configuration learn to draw crisp, valid shapes?

Each named configuration (a preset) trains on fresh shapes for a wall-clock budget. At each evaluation the
clock pauses, the sampling model (the EMA weights when the preset has them) draws --samples images with the
preset's sampler, and du.evaluate_samples scores them; evaluation time is never counted as training.

Where the evaluations fall: two modes.
  --budgets 5,15   every budget is its own fresh run (per preset and seed), evaluated at its end. A preset with
                   a decaying learning rate (TrainConfig.lr_schedule="cosine") needs this: the Trainer decays the
                   lr to 0 at the end of each train() call's budget, so "a 5-minute run" is a run that was told
                   5 minutes, not the first 5 minutes of a 15-minute one. Right for every preset; --minutes is
                   not used.
  --eval-at 3,6,9  one run per preset and seed of --minutes, trained in chunks (trainer.train(minutes=chunk))
                   and evaluated between them: one run gives a whole curve, cheaper, but it only measures what
                   it says for a constant learning rate (each chunk of a decaying preset would decay on its own).
                   The script refuses a decaying preset with more than one --eval-at point.
  neither          chunked evaluation at 0.2, 0.4, ... 1.0 x --minutes when every preset keeps a constant lr,
                   else one budget of --minutes.

Seeds: --seeds 0,1,2 trains every preset once per training seed (the sampling seed stays fixed). The tables
list each seed's row, then the mean and the spread (min-max) per preset and budget (or evaluation point); the
plot draws the mean with the min-max band.

Presets (build_presets, one line each; the command line's overrides apply to all):
  original            du.original_design_configs(): linear schedule, eps target, time at the bottleneck only,
                      plain MSE, no EMA; sampled with 1000 DDPM steps
  previous            bc.previous_recipe(device): the recipe before the learning-rate decay and conditioning
                      (unconditional, constant lr 1e-3), spelled out field by field
  recipe              du.default_configs(device), sampled with 100 DDPM steps
  --ablation          the original plus one change at a time, cumulatively. The first change is the sampler
                      alone: the original's trained model is also sampled with 100 DDPM steps ("+100-step
                      sampling"), and every later step is sampled that way too. Then +cosine, +v, +min-snr-5
                      (Hang et al.'s formula, min_snr_form="paper"), +time-every-block, +ema, +attention,
                      +min-snr-cap (min_snr_form="cap"), +lr-decay and +conditioning; a step that would not
                      change anything against the CPU recipe (du.default_configs("cpu")) is left out, and the
                      last one is that recipe. --configs +min-snr-cap (any step's name) runs steps alone.
Conditional presets: the main row scores unconditional samples (the null condition), comparable with every
other preset; a second row, "NAME, asked", asks for the class, centre and size of real shapes (du.make_shapes,
a fixed seed) with guidance --guidance and reports du.evaluate_requests, on as many samples as the main row
(--request-samples N changes that; 0 skips it).

1000-step sampling is slow on a CPU (about 10x the 100-step cost), so configurations sampled with it draw
--original-samples images (default 64: valid % then has a standard error of about 6 points at 50%);
--original-steps can lower the step count for quick looks. 100-step sampling keeps validity within a few
points of 1000 steps (the samplers table of benchmarks/RESULTS.md), which is why the ablation switches the sampler
first and scores every later step on --samples images. Runs are sequential, never in parallel.

Examples (on the 2-core CPU: about 40 min; about 90 min for the ablation; the third about 90 min):
    python benchmarks/time_to_quality.py --minutes 15 --eval-at 3,6,9,12,15
    python benchmarks/time_to_quality.py --ablation --minutes 10 --eval-at 10 --out benchmarks/results/ablation
    python benchmarks/time_to_quality.py --configs previous,recipe --budgets 5,15 --seeds 0,1
Smoke test (seconds):
    python benchmarks/time_to_quality.py --minutes 0.1 --eval-at 0.05,0.1 --samples 8 \\
        --original-samples 4 --original-steps 20 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
    python benchmarks/time_to_quality.py --configs previous,recipe --budgets 0.03,0.05 --seeds 0,1 --samples 8 \\
        --conditional --lr-schedule cosine --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

DEFAULT_CONFIGS = ("original", "recipe")
REQUEST_SEED = 4321  # the real shapes whose class, centre and size conditional presets are asked for
SUMMARY_METRICS = (
    "images_seen",
    "valid",
    "mid_gray",
    "circle_share",
    "size_w1",
    "position_w1",
    "matches",
    "class_accuracy",
    "center_error",
    "size_error",
)


@dataclass
class Evaluation:
    """One way of sampling a trained configuration: a row label, the sampler and how many images."""

    label: str
    sampler: str
    steps: int
    samples: int


@dataclass
class Preset:
    name: str
    model: du.ModelConfig
    train: du.TrainConfig
    evaluations: list[Evaluation] = field(default_factory=list)
    note: str = ""

    @property
    def decays(self) -> bool:
        """True when the learning rate decays over each train() call (chunked evaluation would mislead)."""
        return self.train.lr_schedule != "constant"


@dataclass
class Plan:
    """What to run: the presets in order, the seeds, and the evaluation points of one mode."""

    names: list[str]
    seeds: list[int]
    mode: str  # "budgets": a fresh run per point; "eval_at": one chunked run, evaluated at each point
    points: list[float]  # minutes
    out_dir: Path


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------


def ablation_steps(target_model: du.ModelConfig, target_train: du.TrainConfig) -> list[tuple[str, dict, dict]]:
    """(name, model changes, train changes) from the original design towards the target recipe, in order."""
    t = target_train
    return [
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


def ablation_chain(
    original: tuple[du.ModelConfig, du.TrainConfig], target: tuple[du.ModelConfig, du.TrainConfig]
) -> list[tuple[str, du.ModelConfig, du.TrainConfig, str]]:
    """The cumulative chain (name, model, train, note), leaving out steps that change nothing."""
    model, train = original
    chain = []
    for name, model_changes, train_changes in ablation_steps(*target):
        changed = dataclasses.replace(model, **model_changes), dataclasses.replace(train, **train_changes)
        if changed == (model, train):
            continue
        model, train = changed
        chain.append((name, model, train, f"previous + {model_changes | train_changes}"))
    if (model, train) != target:
        raise RuntimeError("the ablation chain no longer ends at du.default_configs('cpu'): update ablation_steps")
    return chain


def build_presets(args: argparse.Namespace, device: torch.device) -> dict[str, Preset]:
    """Every named configuration, with the command line's model overrides applied."""
    long_eval = Evaluation("", "ddpm", args.original_steps, args.original_samples)

    def short(label: str) -> list[Evaluation]:
        return [Evaluation(label, "ddpm", 100, args.samples)]

    original = du.original_design_configs()
    original_evaluations = [dataclasses.replace(long_eval, label="original")]
    if args.ablation:
        original_evaluations += short("+100-step sampling")
    raw = {
        "original": (*original, original_evaluations, "du.original_design_configs()"),
        "previous": (*bc.previous_recipe(device), short("previous"), "bc.previous_recipe(device)"),
        "recipe": (*du.default_configs(device), short("recipe"), "du.default_configs(device)"),
    }
    if args.ablation or any(name.startswith("+") for name in (args.configs or "").split(",")):  # built when asked for
        chain = ablation_chain(original, du.default_configs("cpu"))
        raw |= {name: (model, train, short(name), note) for name, model, train, note in chain}
        last = chain[-1][0]
        raw[last] = (*raw[last][:3], raw[last][3] + " = du.default_configs('cpu'), the CPU recipe")
    presets = {}
    for name, (model, train, evaluations, note) in raw.items():
        model, train = bc.apply_overrides(model, train, args)
        presets[name] = Preset(name, model, train, evaluations, note)
    return presets


def ablation_names(presets: dict[str, Preset]) -> list[str]:
    return ["original"] + [name for name in presets if name.startswith("+")]


# ------------------------------------------------------------------------------------------
# Command line and plan
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = bc.make_parser(__doc__, "runs/benchmarks/time_to_quality")
    add = parser.add_argument
    add("--minutes", type=float, default=15.0, help="--eval-at mode: training budget per run (default 15)")
    add(
        "--eval-at",
        type=bc.parse_floats,
        default=None,
        help="evaluation points in minutes of one chunked run (default 3,6,9,12,15 scaled to --minutes)",
    )
    add(
        "--budgets",
        type=bc.parse_floats,
        default=None,
        help="minutes: each a fresh run per preset and seed, evaluated at its end (needed for a decaying lr)",
    )
    add("--seeds", type=bc.parse_ints, default=None, help="training seeds, each a run per preset (default: --seed)")
    add(
        "--configs",
        help="comma-separated presets to run, in order (default original,recipe; with --ablation the whole chain)",
    )
    add(
        "--ablation",
        action="store_true",
        help="run the cumulative ablation chain from the original design to the recipe",
    )
    add("--samples", type=int, default=256, help="images drawn per evaluation with 100-step sampling (default 256)")
    add(
        "--original-samples",
        type=int,
        default=64,
        help="images per evaluation for configurations sampled with --original-steps DDPM steps (default 64)",
    )
    add("--original-steps", type=int, default=1000, help="DDPM steps for the original design (default 1000)")
    add(
        "--request-samples",
        type=int,
        default=None,
        help="conditional presets: images asked for real shapes' requests (default: as the main row; 0 skips)",
    )
    add("--guidance", type=float, default=du.DEFAULT_GUIDANCE, help="guidance scale for the requests (default 1)")
    add("--sample-batch-size", type=int, default=256, help="images per sampling chunk (default 256)")
    bc.add_model_override_args(parser)
    return parser


def make_plan(args: argparse.Namespace, presets: dict[str, Preset], parser: argparse.ArgumentParser) -> Plan:
    """The presets, seeds and evaluation points asked for, or a parser error saying what does not fit."""
    names = args.configs.split(",") if args.configs else ablation_names(presets) if args.ablation else DEFAULT_CONFIGS
    names = list(names)
    unknown = [n for n in names if n not in presets]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(presets)}")
    if args.budgets is not None and args.eval_at is not None:
        parser.error("give --budgets (a fresh run per budget) or --eval-at (one chunked run), not both")
    seeds = list(dict.fromkeys(args.seeds if args.seeds else [args.seed]))
    decaying = [n for n in names if presets[n].decays]
    budgets = args.budgets if args.budgets is not None or args.eval_at or not decaying else [args.minutes]
    if budgets is not None:
        if min(budgets) <= 0:
            parser.error("--budgets must be positive minutes")
        return Plan(names, seeds, "budgets", sorted(set(budgets)), bc.prepare_out(args.out))
    points = sorted(args.eval_at or [args.minutes * f for f in (0.2, 0.4, 0.6, 0.8, 1.0)])
    if points[-1] > args.minutes + 1e-9 or points[0] <= 0:
        parser.error(f"--eval-at points must lie in (0, --minutes={args.minutes}]")
    if decaying and len(points) > 1:
        parser.error(
            f"{', '.join(decaying)} decay(s) the learning rate over each train() call, so evaluating one chunked run "
            "at several points would not measure runs of those lengths: use --budgets"
        )
    return Plan(names, seeds, "eval_at", points, bc.prepare_out(args.out))


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------


class Report:
    """The rows so far and the payload that holds them, saved after every row."""

    def __init__(self, args: argparse.Namespace, plan: Plan, presets: dict[str, Preset], env: dict) -> None:
        self.plan, self.env, self.rows = plan, env, []
        self.asked = args.request_samples != 0 and any(presets[n].model.conditional for n in plan.names)
        self.columns = table_columns(plan, ROW_COLUMNS, REQUEST_KEYS, self.asked)
        self.payload = {
            "benchmark": "time_to_quality",
            "environment": env,
            "args": vars(args),
            "mode": plan.mode,
            "points_minutes": plan.points,
            "seeds": plan.seeds,
            "presets": {
                n: {
                    "model": presets[n].model,
                    "train": presets[n].train,
                    "evaluations": presets[n].evaluations,
                    "note": presets[n].note,
                }
                for n in plan.names
            },
            "rows": self.rows,
        }

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(bc.markdown_table([row], self.columns).splitlines()[-1], flush=True)
        self.save()

    def save(self) -> None:
        bc.save_json(self.plan.out_dir / "time_to_quality.json", self.payload)


def run_preset(preset: Preset, args: argparse.Namespace, plan: Plan, device: torch.device, report: Report) -> None:
    """Every seed of one preset: a fresh run per budget, or one chunked run evaluated at each point."""
    for seed in plan.seeds:
        train = dataclasses.replace(preset.train, seed=seed)
        if plan.mode == "budgets":
            for budget in plan.points:
                trainer = new_trainer(preset, train, device, seed)
                seconds = train_for(trainer, budget, device)
                evaluate(trainer, preset, args, plan, report, seed, budget, seconds)
        else:
            trainer, seconds = new_trainer(preset, train, device, seed), 0.0
            for point in plan.points:
                seconds += train_for(trainer, point - seconds / 60, device)
                evaluate(trainer, preset, args, plan, report, seed, point, seconds)
        save_checkpoint(trainer, preset, plan, seed)


def new_trainer(preset: Preset, train: du.TrainConfig, device: torch.device, seed: int) -> du.Trainer:
    trainer = du.Trainer(preset.model, train, device=device)
    print(f"\n## {preset.name}, seed {seed}: {du.describe_model(trainer.model)}; {preset.note}", flush=True)
    return trainer


def train_for(trainer: du.Trainer, minutes: float, device: torch.device) -> float:
    """Train for `minutes` more (nothing when <= 0) and return the seconds it took, the device synced."""
    if minutes <= 0:
        return 0.0
    start = time.perf_counter()
    trainer.train(minutes=minutes, progress=False)
    bc.synchronize(device)
    return time.perf_counter() - start


def evaluate(
    trainer: du.Trainer,
    preset: Preset,
    args: argparse.Namespace,
    plan: Plan,
    report: Report,
    seed: int,
    point: float,
    seconds: float,
) -> None:
    """Score every evaluation of the preset (and its requests, when conditional) and add their rows."""
    common = {
        "preset": preset.name,
        "seed": seed,
        "mode": plan.mode,
        "minutes": point,
        "train_minutes": seconds / 60,
        "steps_trained": trainer.step,
        "images_seen": trainer.images_seen,
        "loss": bc.mean_tail(trainer.losses),
    }
    grid_dir = plan.out_dir if point == plan.points[-1] and seed == plan.seeds[0] else None  # one grid per config
    for ev in preset.evaluations:
        report.add({"config": ev.label, **common, **score_samples(trainer, ev, args, grid_dir)})
    ev = preset.evaluations[-1]
    requests = args.request_samples if args.request_samples is not None else ev.samples
    if preset.model.conditional and requests > 0:
        report.add({"config": f"{ev.label}, asked", **common, **score_asked(trainer, ev, requests, args, grid_dir)})


def score_samples(trainer: du.Trainer, ev: Evaluation, args: argparse.Namespace, grid_dir: Path | None) -> dict:
    """Unconditional samples (the null condition for a conditional model), scored by du.evaluate_samples."""
    metrics, images = bc.sample_and_evaluate(
        trainer.sampling_model,
        trainer.schedule,
        ev.samples,
        ev.sampler,
        ev.steps,
        trainer.device,
        batch_size=args.sample_batch_size,
    )
    if grid_dir is not None:
        title = f"{ev.label}: {trainer.images_seen} images seen, {ev.sampler} {ev.steps} steps"
        title += f", valid {100 * metrics['valid']:.0f}%"
        save_grid(images, title, grid_dir / f"samples_{_slug(ev.label)}.png")
    return metrics


def score_asked(trainer: du.Trainer, ev: Evaluation, n: int, args: argparse.Namespace, grid_dir: Path | None) -> dict:
    """n samples asked for the class, centre and size of n real shapes, scored by du.evaluate_requests."""
    condition = du.make_shapes(n, seed=REQUEST_SEED).condition()
    _, images = bc.sample_and_evaluate(
        trainer.sampling_model,
        trainer.schedule,
        n,
        ev.sampler,
        ev.steps,
        trainer.device,
        batch_size=args.sample_batch_size,
        condition=condition,
        guidance=args.guidance,
    )
    metrics = {"sampler": ev.sampler, "steps": ev.steps, "guidance": args.guidance}
    metrics |= du.evaluate_requests(images, condition)
    if grid_dir is not None:
        label = f"{ev.label}, asked"
        outline = du.request_matches(images[:32], condition.select(slice(0, 32)))
        title = f"{label}: matches {100 * metrics['matches']:.0f}% (guidance {args.guidance:g})"
        save_grid(images, title, grid_dir / f"samples_{_slug(label)}.png", outline)
    return metrics


def save_grid(images: torch.Tensor, title: str, path: Path, outline: list[bool] | None = None) -> None:
    du.save_figure(du.plot_grid(images[:32], title=title, outline=outline), path)


def save_checkpoint(trainer: du.Trainer, preset: Preset, plan: Plan, seed: int) -> None:
    """The last run of each preset and seed (for benchmarks that take a --checkpoint)."""
    suffix = "" if seed == plan.seeds[0] else f"_seed{seed}"
    du.save_checkpoint(plan.out_dir / f"{_slug(preset.name)}{suffix}.pt", trainer)


def _slug(label: str) -> str:
    """A file-name stem: "+min-snr-5" -> "min_snr_5", "recipe, asked" -> "recipe_asked"."""
    return "_".join("".join(c if c.isalnum() else " " for c in label).split()) or "config"


# ------------------------------------------------------------------------------------------
# Report: per-seed rows, mean and spread over seeds, the plot
# ------------------------------------------------------------------------------------------

ROW_COLUMNS = [
    ("config", "config", ""),
    ("seed", "seed", ""),
    ("minutes", "{point}", "g"),
    ("train_minutes", "minutes trained", ".2f"),
    ("images_seen", "images seen", ""),
    ("sampler", "sampler", ""),
    ("steps", "steps", ""),
    ("n", "n", ""),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1 (px)", ".2f"),
    ("position_w1", "position W1 (px)", ".2f"),
    ("matches", "asked: matches", "%"),
    ("class_accuracy", "asked: class right", "%"),
    ("center_error", "asked: centre error (px)", ".2f"),
    ("size_error", "asked: size error (px)", ".2f"),
    ("loss", "loss (last 50)", ".4f"),
]
REQUEST_KEYS = ("matches", "class_accuracy", "center_error", "size_error")


def point_header(plan: Plan) -> str:
    return "budget (min)" if plan.mode == "budgets" else "eval at (min)"


def table_columns(
    plan: Plan, columns: list[tuple[str, str, str]], request_keys: tuple[str, ...], asked: bool
) -> list[tuple[str, str, str]]:
    """A table's columns with the point's header filled in; request_keys only when conditional presets are asked
    for shapes."""
    return [
        (key, header.format(point=point_header(plan)), spec)
        for key, header, spec in columns
        if asked or key not in request_keys
    ]


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
        summary.append(entry)
    return summary


def spread(entry: dict, key: str, spec: str) -> str:
    if f"{key}_min" not in entry:
        return "–"
    low, high = bc.format_value(entry[f"{key}_min"], spec), bc.format_value(entry[f"{key}_max"], spec)
    return low if low == high else f"{low} – {high}"


SUMMARY_COLUMNS = [
    ("config", "config", ""),
    ("minutes", "{point}", "g"),
    ("seeds", "seeds", ""),
    ("images_seen_mean", "images seen (mean)", ",.0f"),
    ("valid_mean", "valid (mean)", "%"),
    ("valid_spread", "valid (min – max)", ""),
    ("mid_gray_mean", "mid-gray (mean)", "%"),
    ("mid_gray_spread", "mid-gray (min – max)", ""),
    ("circle_share_mean", "circle share (mean)", ".2f"),
    ("size_w1_mean", "size W1 (mean)", ".2f"),
    ("position_w1_mean", "position W1 (mean)", ".2f"),
    ("matches_mean", "asked: matches (mean)", "%"),
    ("matches_spread", "asked: matches (min – max)", ""),
    ("center_error_mean", "asked: centre error (mean)", ".2f"),
    ("size_error_mean", "asked: size error (mean)", ".2f"),
]
SUMMARY_REQUEST_KEYS = ("matches_mean", "matches_spread", "center_error_mean", "size_error_mean")


def summary_table(plan: Plan, summary: list[dict], asked: bool) -> str:
    shown = [
        {**entry, **{f"{key}_spread": spread(entry, key, "%") for key in ("valid", "mid_gray", "matches")}}
        for entry in summary
    ]
    return bc.markdown_table(shown, table_columns(plan, SUMMARY_COLUMNS, SUMMARY_REQUEST_KEYS, asked))


def plot_quality(plan: Plan, rows: list[dict], summary: list[dict], device_name: str):
    """Valid and mid-gray shares against minutes: each configuration's mean, its min-max band, each seed's point."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    configs = list(dict.fromkeys(e["config"] for e in summary if "mid_gray_mean" in e))  # not the "asked" rows
    for ax, key, ylabel in zip(axes, ("valid", "mid_gray"), ("valid shapes", "mid-gray pixels")):
        for k, config in enumerate(configs):
            color = f"C{k % 10}"
            entries = sorted((e for e in summary if e["config"] == config), key=lambda e: e["minutes"])
            xs = [e["minutes"] for e in entries]
            ax.plot(xs, [e.get(f"{key}_mean", math.nan) for e in entries], "o-", ms=3, color=color, label=config)
            if plan.seeds[1:]:
                low = [e.get(f"{key}_min", math.nan) for e in entries]
                high = [e.get(f"{key}_max", math.nan) for e in entries]
                ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
                seeds = [r for r in rows if r["config"] == config and r.get(key) is not None]
                ax.plot([r["minutes"] for r in seeds], [r[key] for r in seeds], ".", color=color, alpha=0.5)
        ax.set_xlabel("minutes of training per run" if plan.mode == "budgets" else "minutes of training")
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, None)
    seeds = f"mean of {len(plan.seeds)} seeds, band min-max" if plan.seeds[1:] else f"seed {plan.seeds[0]}"
    fig.suptitle(f"Time to quality on {device_name} ({seeds}; evaluation excluded)")
    return fig


def write_report(report: Report) -> None:
    plan, rows = report.plan, report.rows
    summary = summarize(rows)
    report.payload["summary"] = summary
    table = bc.markdown_table(rows, report.columns)
    means = summary_table(plan, summary, report.asked)
    text = f"## Results, one row per seed\n\n{table}\n\n## Mean and spread over seeds\n\n{means}"
    print(f"\n{text}")
    du.save_figure(plot_quality(plan, rows, summary, report.env["device_name"]), plan.out_dir / "valid_vs_minutes.png")
    (plan.out_dir / "time_to_quality.md").write_text(
        f"# Time to quality\n\n{bc.environment_line(report.env)}\n\n{text}\n"
    )
    report.save()
    print(f"\nsaved {plan.out_dir / 'time_to_quality.json'}, time_to_quality.md, valid_vs_minutes.png and sample grids")


def describe_plan(plan: Plan, args: argparse.Namespace) -> str:
    if plan.mode == "budgets":
        when = f"a fresh run per budget of {', '.join(f'{p:g}' for p in plan.points)} min, evaluated at its end"
    else:
        when = f"one run of {args.minutes:g} min per configuration, evaluated at {plan.points} min"
    return f"{when}; seeds {plan.seeds}; configurations: {', '.join(plan.names)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = bc.setup(args)
    presets = build_presets(args, device)
    plan = make_plan(args, presets, parser)
    env = bc.environment(device)
    print(f"# Time to quality\n{bc.environment_line(env)}\n{describe_plan(plan, args)}", flush=True)
    report = Report(args, plan, presets, env)
    print("\n" + "\n".join(bc.markdown_table([], report.columns).splitlines()[:2]))
    for name in plan.names:
        run_preset(presets[name], args, plan, device, report)
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
