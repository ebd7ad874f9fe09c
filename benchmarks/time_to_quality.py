"""Time to quality: how fast does each configuration learn to draw crisp, valid shapes?

Issue "Crisp, valid shapes fast". Each named configuration trains for the same wall-clock budget
(--minutes). At each evaluation point (--eval-at, minutes of training) the clock pauses, the
sampling model (the EMA weights when the configuration has them) draws --samples images with
that configuration's sampler, and du.evaluate_samples scores them. Evaluation time is excluded:
training runs in chunks with trainer.train(minutes=chunk) between the points.

Configurations (named presets, all built from du.default_configs / du.original_design_configs):
  original            du.original_design_configs(): linear schedule, eps target, time at the
                      bottleneck only, plain MSE, no EMA; sampled with 1000 DDPM steps
  recipe              du.default_configs(device), sampled with 100 DDPM steps
  --ablation          the original plus one change at a time, cumulatively. The first change
                      is the sampler alone: the original's trained model is also sampled with
                      100 DDPM steps ("+100-step sampling"), and every later step is sampled
                      that way too. Then +cosine, +v, +min-snr-5 (Hang et al.'s formula,
                      min_snr_form="paper"), +time-every-block, +ema, +attention, and
                      +min-snr-cap (min_snr_form="cap": last because it was adopted last);
                      the last one is du.default_configs("cpu"), the CPU recipe.

1000-step sampling is slow on a CPU (about 10x the 100-step cost), so configurations sampled
with it draw --original-samples images (default 64: valid % then has a standard error of about
6 points at 50%); --original-steps can lower the step count for quick looks. 100-step sampling
keeps validity within a few points of 1000 steps (benchmarks/sampling_speed.py), which is why
the ablation switches the sampler first and scores every later step on --samples images.
Runs are sequential (never in parallel) and all use the same seed.

Examples (the lead's runs on the 2-core CPU: about 40 min, and about 90 min for the ablation):
    python benchmarks/time_to_quality.py --minutes 15 --eval-at 3,6,9,12,15
    python benchmarks/time_to_quality.py --ablation --minutes 10 --eval-at 10 --out benchmarks/results/ablation
Smoke test (seconds):
    python benchmarks/time_to_quality.py --minutes 0.1 --eval-at 0.05,0.1 --samples 8 \\
        --original-samples 4 --original-steps 20 --base-channels 8 --channel-mults 1,2 --batch-size 8 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for diffusion_utils

import _common as bc  # noqa: E402  (benchmarks/ is on sys.path as this script's folder)

import diffusion_utils as du  # noqa: E402

ABLATION = ("original", "+cosine", "+v", "+min-snr-5", "+time-every-block", "+ema", "+attention", "+min-snr-cap")


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


def build_presets(args: argparse.Namespace, device) -> dict[str, Preset]:
    """Every named configuration, with the command line's model overrides applied."""
    long_eval = Evaluation("", "ddpm", args.original_steps, args.original_samples)

    def evaluation(label: str, sampler: str = "ddpm", steps: int | None = None, samples: int | None = None) -> Evaluation:
        return Evaluation(label, sampler, steps or long_eval.steps, samples or long_eval.samples)

    recipe_model, recipe_train = du.default_configs(device)
    original_model, original_train = du.original_design_configs()
    presets: dict[str, Preset] = {}

    def add(name: str, model: du.ModelConfig, train: du.TrainConfig, evaluations: list[Evaluation], note: str) -> None:
        model, train = bc.apply_overrides(model, train, args)
        presets[name] = Preset(name, model, train, evaluations, note)

    short = evaluation("+100-step sampling", "ddpm", 100, args.samples)
    original_evaluations = [evaluation("original")] + ([short] if args.ablation else [])
    add("original", original_model, original_train, original_evaluations, "du.original_design_configs()")
    add("recipe", recipe_model, recipe_train, [evaluation("recipe", "ddpm", 100, args.samples)], "du.default_configs(device)")
    # The ablation chain: the original plus one change at a time (cumulative), same network size,
    # each sampled with 100 DDPM steps (the sampler is the chain's first change, see above).
    cpu_model, cpu_train = du.default_configs("cpu")
    model, train = original_model, original_train
    changes = {
        "+cosine": ("model", {"schedule": "cosine"}),
        "+v": ("model", {"prediction": "v"}),
        "+min-snr-5": ("train", {"min_snr_gamma": cpu_train.min_snr_gamma, "min_snr_form": "paper"}),
        "+time-every-block": ("model", {"time_injection": "every_block"}),
        "+ema": ("train", {"ema_decay": cpu_train.ema_decay}),
        "+attention": ("model", {"bottleneck_attention": True}),
        "+min-snr-cap": ("train", {"min_snr_form": cpu_train.min_snr_form}),
    }
    for name, (which, change) in changes.items():
        if which == "model":
            model = dataclasses.replace(model, **change)
        else:
            train = dataclasses.replace(train, **change)
        add(name, model, train, [evaluation(name, "ddpm", 100, args.samples)], f"previous + {change}")
    if (model, train) != (cpu_model, cpu_train):
        raise RuntimeError("the ablation chain no longer ends at du.default_configs('cpu'): update the list of changes")
    presets[ABLATION[-1]].note += " = du.default_configs('cpu'), the CPU recipe"
    return presets


def run_preset(preset: Preset, args: argparse.Namespace, device, rows: list[dict], save) -> None:
    """Train one configuration in chunks, evaluating (clock paused) at each --eval-at point."""
    trainer = du.Trainer(preset.model, preset.train, device=device)
    print(f"\n## {preset.name}: {du.describe_model(trainer.model)}; {preset.note}", flush=True)
    trained_seconds = 0.0
    for point in args.eval_at:
        chunk = point - trained_seconds / 60
        if chunk > 0:
            start = time.perf_counter()
            trainer.train(minutes=chunk, progress=False)
            bc.synchronize(device)
            trained_seconds += time.perf_counter() - start
        for ev in preset.evaluations:
            metrics, images = bc.sample_and_evaluate(
                trainer.sampling_model, trainer.schedule, ev.samples, ev.sampler, ev.steps, trainer.device, batch_size=args.sample_batch_size
            )
            row = {
                "config": ev.label,
                "preset": preset.name,
                "eval_at_minutes": point,
                "train_minutes": trained_seconds / 60,
                "steps_trained": trainer.step,
                "images_seen": trainer.images_seen,
                "loss": bc.mean_tail(trainer.losses),
                **metrics,
            }
            rows.append(row)
            print(bc.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
            if point == args.eval_at[-1]:
                title = f"{ev.label}: {trainer.images_seen} images seen, {ev.sampler} {ev.steps} steps, valid {100 * metrics['valid']:.0f}%"
                bc.save_figure(du.plot_grid(images[:32], title=title), args.out_dir / f"samples_{_slug(ev.label)}.png")
            save()
    du.save_checkpoint(args.out_dir / f"{_slug(preset.name)}.pt", trainer)  # for sampling_speed.py --checkpoint


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_") or "config"


COLUMNS = [
    ("config", "config", ""),
    ("train_minutes", "minutes", ".2f"),
    ("images_seen", "images seen", ""),
    ("sampler", "sampler", ""),
    ("steps", "steps", ""),
    ("n", "n", ""),
    ("valid", "valid", "%"),
    ("mid_gray", "mid-gray", "%"),
    ("circle_share", "circle share", ".2f"),
    ("size_w1", "size W1 (px)", ".2f"),
    ("position_w1", "position W1 (px)", ".2f"),
    ("loss", "loss (last 50)", ".4f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/time_to_quality")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per configuration (default 15)")
    parser.add_argument(
        "--eval-at", type=bc.parse_floats, default=None, help="evaluation points in minutes of training (default 3,6,9,12,15 scaled to --minutes)"
    )
    parser.add_argument("--configs", help=f"comma-separated presets to run, in order (default original,recipe; with --ablation {','.join(ABLATION)})")
    parser.add_argument("--ablation", action="store_true", help="run the cumulative ablation chain from the original design to the recipe")
    parser.add_argument("--samples", type=int, default=256, help="images drawn per evaluation with 100-step sampling (default 256)")
    parser.add_argument(
        "--original-samples",
        type=int,
        default=64,
        help="images per evaluation for configurations sampled with --original-steps DDPM steps (default 64; 1000 steps is slow on a CPU)",
    )
    parser.add_argument("--original-steps", type=int, default=1000, help="DDPM steps for the original design (default 1000; lower for quick looks)")
    parser.add_argument("--sample-batch-size", type=int, default=256, help="images per sampling chunk (default 256)")
    bc.add_model_override_args(parser)
    args = parser.parse_args(argv)

    device = bc.setup(args)
    args.eval_at = sorted(args.eval_at or [args.minutes * f for f in (0.2, 0.4, 0.6, 0.8, 1.0)])
    if args.eval_at[-1] > args.minutes + 1e-9 or args.eval_at[0] <= 0:
        parser.error(f"--eval-at points must lie in (0, --minutes={args.minutes}]")
    presets = build_presets(args, device)
    names = args.configs.split(",") if args.configs else list(ABLATION if args.ablation else ("original", "recipe"))
    unknown = [n for n in names if n not in presets]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(presets)}")
    args.out_dir = bc.prepare_out(args.out)

    env = bc.environment(device)
    print(
        f"# Time to quality\n{bc.environment_line(env)}\nbudget {args.minutes} min per configuration; evaluations at {args.eval_at} min; configurations: {', '.join(names)}",
        flush=True,
    )
    rows: list[dict] = []
    payload = {
        "benchmark": "time_to_quality",
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "presets": {n: {"model": presets[n].model, "train": presets[n].train, "evaluations": presets[n].evaluations, "note": presets[n].note} for n in names},
        "rows": rows,
    }

    def save() -> None:
        bc.save_json(args.out_dir / "time_to_quality.json", payload)

    print("\n" + "\n".join(bc.markdown_table([], COLUMNS).splitlines()[:2]))
    for name in names:
        run_preset(presets[name], args, device, rows, save)

    table = bc.markdown_table(rows, COLUMNS)
    print(f"\n## Results\n\n{table}")
    labels = list(dict.fromkeys(r["config"] for r in rows))

    def series(key: str) -> dict:
        return {label: ([r["train_minutes"] for r in rows if r["config"] == label], [r[key] for r in rows if r["config"] == label]) for label in labels}

    fig = bc.line_plot(
        [("valid shapes", series("valid")), ("mid-gray pixels", series("mid_gray"))],
        "minutes of training (evaluation excluded)",
        f"Time to quality on {env['device_name']}",
        percent=(True, True),
        ylims=((0, 1.02), (0, None)),
    )
    bc.save_figure(fig, args.out_dir / "valid_vs_minutes.png")
    bc.save_text(args.out_dir / "time_to_quality.md", f"# Time to quality\n\n{bc.environment_line(env)}\n\n{table}\n")
    save()
    print(f"\nsaved {args.out_dir / 'time_to_quality.json'}, time_to_quality.md, valid_vs_minutes.png and sample grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
