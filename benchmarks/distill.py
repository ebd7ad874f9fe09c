"""Distillation: a few-step student tuned from a trained checkpoint, by method, tuning budget and evaluations.

The targets of section 13 (RESULTS.md, "Distillation"): the teacher's validity with DDPM-1000, then per --methods
entry, tuning seed and budget, a student (du.distiller_from) sampled with its recorded sampler at each --eval-steps
count: valid share, gap to the teacher, circle share and size W1 (px). Writes distill.json and distill.md.

On the CPU recipe's 15-minute checkpoint (two seeds of tuning, 512 samples):
    python benchmarks/distill.py --checkpoint benchmarks/results/time_to_quality/recipe.pt --minutes 1,2,5,10 \\
        --seeds 0,1 --samples 512 --threads 2 --out benchmarks/results/distill
Smoke test (seconds; trains a tiny 3-step teacher on the spot):
    python benchmarks/distill.py --train-steps 3 --budget-steps 2 --samples 4 --teacher-steps 3 --threads 1 \\
        --out /tmp/bench_smoke/distill
"""

from __future__ import annotations

import sys
import time

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too

import diffusion_utils as du

NAME = "distill"
COLUMNS = bc.columns(
    "method; seed; budget|tuning budget; tuning_seconds|tuning s (teacher: training s)|.0f; tuning_steps",
    "steps|evaluations; valid||.3f; gap|gap to teacher (points)|.1f; circle_share||.3f; size_w1|size W1 (px)|.2f",
)


def parse_args(argv: list[str] | None):
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "the teacher: a trained checkpoint")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=bc.parse_floats, default=[1, 2, 5, 10], help="tuning budgets (1,2,5,10)")
    budget.add_argument("--budget-steps", type=bc.parse_ints, help="tuning budgets in steps instead (smoke tests)")
    parser.add_argument("--methods", default="consistency,progressive", help=f"of {', '.join(du.DISTILL_METHODS)}")
    parser.add_argument("--seeds", type=bc.parse_ints, default=[0, 1], help="tuning seeds (0,1)")
    parser.add_argument("--eval-steps", type=bc.parse_ints, default=[1, 2, 4], help="evaluations per image (1,2,4)")
    parser.add_argument("--samples", type=bc.positive_int, default=512, help="images per cell (512)")
    parser.add_argument("--teacher-steps", type=bc.positive_int, default=1000, help="the teacher's DDPM steps (1000)")
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


def student_rows(path: str, method: str, seed: int, budget: dict, reference: float, args, device) -> list[dict]:
    """Tune one student for one budget, then score it at every --eval-steps count with its recorded sampler."""
    distiller = du.distiller_from(path, method, device, seed=seed)
    start = time.perf_counter()
    distiller.train(**budget, progress=False)
    seconds, record = time.perf_counter() - start, distiller.distillation
    label = f"{budget['minutes']:g} min" if "minutes" in budget else f"{budget['steps']} steps"
    model, schedule = distiller.sampling_model.eval(), distiller.schedule
    rows = []
    for steps in args.eval_steps:
        row = scored(model, schedule, args, device, sampler=record.sampler, steps=steps, spacing=record.spacing)
        row.update(method=method, seed=seed, budget=label, tuning_seconds=seconds, tuning_steps=distiller.step)
        row["gap"] = 100 * (reference - row["valid"])
        rows.append(row)
        print(f"{method}, seed {seed}, {label}, {steps} evaluations: valid {row['valid']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    path = teacher_checkpoint(args, device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        du._check_choice("method", method, du.DISTILL_METHODS)
    print(f"{bc.environment_line(env)}\nteacher: {path}", flush=True)
    model, schedule = du.load_model(path, device=device)
    teacher = scored(model, schedule, args, device, sampler="ddpm", steps=args.teacher_steps)
    plan = du.read_checkpoint(path)["state"].get("plan") or {}
    teacher.update(method="teacher", budget="–", gap=0.0, tuning_seconds=plan.get("seconds_spent"))  # its training
    print(f"teacher, ddpm {args.teacher_steps}: valid {teacher['valid']:.3f}", flush=True)
    budgets = [{"steps": s} for s in args.budget_steps] if args.budget_steps else [{"minutes": m} for m in args.minutes]
    rows = [teacher]
    for method in methods:
        for seed in args.seeds:
            for budget in budgets:
                rows += student_rows(path, method, seed, budget, teacher["valid"], args, device)
                bc.save_json(args.out / f"{NAME}.partial.json", {"rows": rows})
    teacher_setting = f"teacher: ddpm, {args.teacher_steps} steps"
    setting = f"{args.samples} images per row, sampling seed {bc.SAMPLE_SEED}; {teacher_setting}"
    sections = [f"teacher: {path}", bc.markdown_table(rows, COLUMNS), setting]
    title = "Distillation: quality against tuning time and evaluations"
    bc.write_report(args.out, NAME, title, env, sections, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
