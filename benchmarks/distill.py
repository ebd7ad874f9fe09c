"""Distillation: a few-step student tuned from a trained checkpoint, by method, tuning budget and evaluations.

The targets of section 13 (RESULTS.md, "Distillation"): the teacher's validity with DDPM-1000, then per --methods
entry, tuning seed and budget, a student (du.distiller_from) sampled with its recorded sampler at each --eval-steps
count: valid share, gap to the teacher, circle share and size W1 (px). Writes distill.json and distill.md.

On the CPU recipe's 15-minute checkpoint (two seeds of tuning, 512 samples): a minute of tuning is the steps the
2-core CPU makes in a minute at 2 threads (--steps-per-minute, measured by --calibrate), so the two seeds can run at
once, one thread each, and be joined:
    python benchmarks/distill.py --checkpoint T.pt --calibrate 60 --threads 2 --out benchmarks/results/distill
    python benchmarks/distill.py --checkpoint T.pt --minutes 1,2,5,10 --steps-per-minute R --seeds 0 \\
        --samples 512 --threads 1 --out benchmarks/results/distill/seed0   # and --seeds 1 into .../seed1
    python benchmarks/distill.py --join benchmarks/results/distill/seed0,benchmarks/results/distill/seed1 \\
        --out benchmarks/results/distill
Smoke test (seconds; trains a tiny 3-step teacher on the spot):
    python benchmarks/distill.py --train-steps 3 --budget-steps 2 --samples 4 --teacher-steps 3 --threads 1 \\
        --out /tmp/bench_smoke/distill
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch

import diffusion_utils as du

NAME = "distill"
COLUMNS = bc.columns(
    "method; seed; budget|tuning budget; tuning_seconds|tuning s (teacher: training s)|.0f; tuning_steps",
    "steps|evaluations; valid||.3f; gap|gap to teacher (points)|.1f; circle_share||.3f; size_w1|size W1 (px)|.2f",
)


def parse_args(argv: list[str] | None):
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "the teacher: a trained checkpoint", required=False)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=bc.parse_floats, default=[1, 2, 5, 10], help="tuning budgets (1,2,5,10)")
    budget.add_argument("--budget-steps", type=bc.parse_ints, help="tuning budgets in steps instead (smoke tests)")
    parser.add_argument("--methods", default="consistency,progressive", help=f"of {', '.join(du.DISTILL_METHODS)}")
    parser.add_argument("--seeds", type=bc.parse_ints, default=[0, 1], help="tuning seeds (0,1)")
    parser.add_argument("--eval-steps", type=bc.parse_ints, default=[1, 2, 4], help="evaluations per image (1,2,4)")
    parser.add_argument("--samples", type=bc.positive_int, default=512, help="images per cell (512)")
    parser.add_argument("--teacher-steps", type=bc.positive_int, default=1000, help="the teacher's DDPM steps (1000)")
    parser.add_argument("--teacher-valid", type=float, help="the teacher's valid share, already measured: not sampled")
    parser.add_argument("--steps-per-minute", type=float, help="tune --minutes as this many steps per minute")
    parser.add_argument("--calibrate", type=float, help="only measure each method's steps per minute over N seconds")
    parser.add_argument("--online-target", action="store_true", help="consistency: the student as its own target")
    parser.add_argument("--picture", default="0:5", help="SEED:MINUTES of the first method's steps.png (0:5)")
    parser.add_argument("--join", help="only join the rows of these comma-separated --out folders into --out")
    return parser.parse_args(argv)


def teacher_checkpoint(args, device) -> str:
    """--checkpoint, or (smoke tests) a tiny teacher trained here and saved in --out."""
    if args.checkpoint:
        return args.checkpoint
    model = du.ModelConfig(base_channels=8, channel_mults=(1, 2), pixel_unshuffle=2, conditional=False)
    trainer = du.Trainer(model, du.TrainConfig(batch_size=8, channels_last=False, seed=args.seed), device=device)
    trainer.train(steps=args.train_steps, progress=False)
    return str(du.save_checkpoint(args.out / "teacher.pt", trainer))


def scored(model, schedule, args, device, **options) -> dict:
    metrics, _ = bc.sample_and_evaluate(model, schedule, args.samples, device=device, **options)
    return {key: metrics[key] for key in ("sampler", "steps", "valid", "circle_share", "size_w1", "sample_seconds")}


def tuned(path: str, method: str, seed: int, budget: dict, args, device) -> tuple[du.Distiller, float]:
    """A student tuned from the teacher at path for one budget (steps, or minutes at --steps-per-minute)."""
    online = {"target_decay": None} if args.online_target and method == "consistency" else {}
    distiller = du.distiller_from(path, method, device, seed=seed, **online)
    if "minutes" in budget and args.steps_per_minute:
        budget = {"steps": max(1, round(budget["minutes"] * args.steps_per_minute))}
    start = time.perf_counter()
    distiller.train(**budget, progress=False)
    return distiller, time.perf_counter() - start


def budget_label(budget: dict) -> str:
    return f"{budget['minutes']:g} min" if "minutes" in budget else f"{budget['steps']} steps"


def student_rows(path: str, method: str, seed: int, budget: dict, reference: float, args, device) -> list[dict]:
    """Tune one student for one budget, then score it at every --eval-steps count with its recorded sampler (and
    draw steps.png for the --picture budget)."""
    distiller, seconds = tuned(path, method, seed, budget, args, device)
    record, label = distiller.distillation, budget_label(budget)
    model, schedule = distiller.sampling_model.eval(), distiller.schedule
    rows = []
    for steps in args.eval_steps:
        row = scored(model, schedule, args, device, sampler=record.sampler, steps=steps, spacing=record.spacing)
        row.update(method=method, seed=seed, budget=label, tuning_seconds=seconds, tuning_steps=distiller.step)
        row["target_decay"] = record.target_decay
        row["gap"] = 100 * (reference - row["valid"])
        rows.append(row)
        print(f"{method}, seed {seed}, {label}, {steps} evaluations: valid {row['valid']:.3f}", flush=True)
    if f"{seed}:{budget.get('minutes', budget.get('steps')):g}" == args.picture and method == args.methods_list[0]:
        picture(path, model, record, f"{method}, {label}", args, device)
    return rows


def picture(path: str, student, record, label: str, args, device, n: int = 8) -> None:
    """steps.png: the student's samples at each --eval-steps count beside the teacher's DDPM-100, from the same
    starting noise (the teacher's ancestral steps add fresh noise on the way, the student's 1-step map none)."""
    teacher, schedule = du.load_model(path, device=device)
    x_T = torch.randn(n, 1, du.IMAGE_SIZE, du.IMAGE_SIZE, generator=torch.Generator().manual_seed(bc.SAMPLE_SEED))
    common = dict(seed=bc.SAMPLE_SEED, progress=False, initial_noise=x_T)
    rows = [du.sample(teacher, schedule, n, sampler="ddpm", steps=100, **common).images]
    labels = ["teacher, DDPM-100"]
    for steps in args.eval_steps:
        options = dict(sampler=record.sampler, steps=steps, spacing=record.spacing)
        rows.append(du.sample(student, schedule, n, **options, **common).images)
        labels.append(f"{steps} step{'s' if steps > 1 else ''}")
    figure = du.plot_grid(torch.cat(rows), columns=n, row_labels=labels, title=f"student: {label}")
    du.save_figure(figure, args.out / "steps.png")


def calibrate(path: str, methods: list[str], args, device) -> int:
    """Each method's tuning steps per minute on this machine, over --calibrate seconds after a warm-up."""
    rates = {}
    for method in methods:
        distiller = du.distiller_from(path, method, device, seed=0)
        distiller.train(steps=5, progress=False)
        start, first = time.perf_counter(), distiller.step
        distiller.train(minutes=args.calibrate / 60, progress=False)
        rates[method] = 60 * (distiller.step - first) / (time.perf_counter() - start)
        print(f"{method}: {rates[method]:.0f} tuning steps per minute", flush=True)
    bc.save_json(args.out / "calibration.json", {"environment": bc.environment(device, __file__), "rates": rates})
    return 0


def joined(args) -> int:
    """The rows of several --out folders (one teacher row, every student row) in one report in --out."""
    found = [json.loads((Path(f) / f"{NAME}.json").read_text()) for f in args.join.split(",")]
    rows = [found[0]["rows"][0]] + [row for record in found for row in record["rows"][1:]]
    env = found[0]["environment"]
    report(args.out, rows, env, found[0]["teacher"], found[0]["setting"])
    return 0


def report(out, rows: list[dict], env: dict, teacher: str, setting: str) -> None:
    sections = [f"teacher: {teacher}", bc.markdown_table(rows, COLUMNS), setting]
    title = "Distillation: quality against tuning time and evaluations"
    bc.write_report(out, NAME, title, env, sections, rows=rows, teacher=teacher, setting=setting)


def teacher_row(path: str, args, device) -> dict:
    """The teacher's DDPM validity (--teacher-steps), or the one given by --teacher-valid, and its training time."""
    if args.teacher_valid is not None:
        teacher = {"sampler": "ddpm", "steps": args.teacher_steps, "valid": args.teacher_valid, "given": True}
    else:
        model, schedule = du.load_model(path, device=device)
        teacher = scored(model, schedule, args, device, sampler="ddpm", steps=args.teacher_steps)
    plan = du.read_checkpoint(path)["state"].get("plan") or {}
    teacher.update(method="teacher", budget="–", gap=0.0, tuning_seconds=plan.get("seconds_spent"))  # its training
    print(f"teacher, ddpm {args.teacher_steps}: valid {teacher['valid']:.3f}", flush=True)
    return teacher


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    if args.join:
        return joined(args)
    if not (args.checkpoint or args.train_steps):
        raise SystemExit("distill.py: --checkpoint or --train-steps is required (unless --join)")
    path = teacher_checkpoint(args, device)
    args.methods_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods_list:
        du._check_choice("method", method, du.DISTILL_METHODS)
    print(f"{bc.environment_line(env)}\nteacher: {path}", flush=True)
    if args.calibrate:
        return calibrate(path, args.methods_list, args, device)
    teacher = teacher_row(path, args, device)
    budgets = [{"steps": s} for s in args.budget_steps] if args.budget_steps else [{"minutes": m} for m in args.minutes]
    rows = [teacher]
    for method in args.methods_list:
        for seed in args.seeds:
            for budget in budgets:
                rows += student_rows(path, method, seed, budget, teacher["valid"], args, device)
                bc.save_json(args.out / f"{NAME}.partial.json", {"rows": rows})
    given = " (measured before, --teacher-valid)" if teacher.get("given") else ""
    rate = f"; a minute of tuning = {args.steps_per_minute:.0f} steps" if args.steps_per_minute else ""
    setting = f"{args.samples} images per row, sampling seed {bc.SAMPLE_SEED}; teacher: ddpm, "
    setting += f"{args.teacher_steps} steps{given}{rate}"
    report(args.out, rows, env, path, setting)
    return 0


if __name__ == "__main__":
    sys.exit(main())
