"""Where does a training step's time go, and how close to the machine's peak does it run?

Profiles --steps training steps of the device's recipe with torch.profiler, grouped into convolution, GroupNorm,
attention, activations, the optimiser and the rest; times drawing a batch of shapes on its own; counts one forward
and backward pass's FLOPs (FlopCounterMode) and measures an fp32 matrix-multiply rate in the same run. Why: on a
2-thread CPU a narrow network's small convolutions can run far below that rate; whether there is speed to win in
the kernels, or only in doing fewer of them, decides where to look. RESULTS.md, "Where a training step's time goes".

The table of RESULTS.md (about a minute each):
    python benchmarks/profile_step.py --out benchmarks/results/profile
    python benchmarks/profile_step.py --no-conditional --out benchmarks/results/profile/unconditional
Smoke test (seconds):
    python benchmarks/profile_step.py --steps 3 --warmup 1 --base-channels 8 --channel-mults 1,2 --threads 1 \\
        --out /tmp/profile_smoke
"""

from __future__ import annotations

import sys
import time

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too
import torch
from torch.profiler import ProfilerActivity, profile

import diffusion_utils as du

# Operator name fragments per group, checked in order (an operator belongs to the first group that matches).
GROUPS = {
    "convolution": ("convolution", "conv2d", "mkldnn_convolution", "slow_conv"),
    "GroupNorm": ("group_norm",),
    "attention": ("scaled_dot_product", "attention", "softmax"),
    "activations": ("silu",),
    "optimiser": ("adam", "_foreach", "clip_grad", "linalg_vector_norm", "lerp"),
}


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/profile")
    parser.add_argument("--steps", type=int, default=30, help="profiled training steps (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before profiling (default 10)")
    bc.add_model_override_args(parser)
    return parser.parse_args(argv)


def build_trainer(args, device) -> tuple[du.Trainer, list]:
    model, train = bc.apply_overrides(*du.default_configs(device, "diffusion"), args)
    trainer = du.Trainer(model, train, device=device)
    batches = du.training_batches(train.batch_size, seed=0)
    return trainer, [next(batches) for _ in range(args.warmup + args.steps)]


def time_data(batch_size: int, count: int = 50) -> float:
    """Milliseconds to draw one batch of shapes (make_shapes, in this process)."""
    start = time.perf_counter()
    for k in range(count):
        du.make_shapes(batch_size, seed=(1, k))
    return (time.perf_counter() - start) / count * 1e3


def profile_steps(trainer: du.Trainer, batches: list, warmup: int, device) -> tuple[dict[str, float], float]:
    """(self time in ms per step, per operator group) and the wall time per step in ms."""
    for batch in batches[:warmup]:
        bc.train_step(trainer, batch)
    bc.synchronize(device)
    profiled = batches[warmup:]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in profiled:
            bc.train_step(trainer, batch)
        bc.synchronize(device)
    wall_ms = (time.perf_counter() - start) / len(profiled) * 1e3
    groups = dict.fromkeys([*GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        group = next((g for g, parts in GROUPS.items() if any(p in name for p in parts)), "other")
        groups[group] += event.self_cpu_time_total / 1e3 / len(profiled)
    return groups, wall_ms


def flops_per_image(trainer: du.Trainer, batch) -> float:
    """FLOPs of one forward and backward pass of the training loss, per image (FlopCounterMode)."""
    images, condition = batch
    images = images.to(trainer.device)
    condition = condition.to(trainer.device) if trainer.model_config.conditional else None

    def loss() -> torch.Tensor:
        prediction, weights = trainer.model_config.prediction, trainer.loss_weights
        return du.diffusion_loss(trainer.model, trainer.schedule, images, prediction, weights, None, condition)

    flops = bc.training_flops_per_image(loss, len(images))
    trainer.model.zero_grad(set_to_none=True)
    return flops


def report(args, env, groups, wall_ms, data_ms, flops, peak, batch_size) -> str:
    total = sum(groups.values())
    rows = [{"part": name, "ms": ms, "share": ms / total} for name, ms in groups.items()]
    rows.append({"part": "data (drawing a batch, measured apart)", "ms": data_ms, "share": data_ms / wall_ms})
    table = bc.markdown_table(rows, bc.columns("part|part of a step; ms|ms per step|.2f; share||%"))
    images_per_s = batch_size / (wall_ms / 1e3)
    achieved = flops * images_per_s / 1e9
    lines = [
        f"# Where a training step's time goes\n\n{bc.environment_line(env)}\n",
        f"`{env['command']}`\n",
        table,
        "",
        f"- wall time per step: {wall_ms:.1f} ms at batch {batch_size} = {images_per_s:.0f} images/s",
        f"- FLOPs per training image (forward + backward): {flops / 1e6:.0f} M",
        f"- achieved: {achieved:.0f} GFLOP/s; fp32 matrix-multiply peak on this device: {peak:.0f} GFLOP/s; "
        f"share of peak: {achieved / peak:.0%}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    trainer, batches = build_trainer(args, device)
    data_ms = time_data(trainer.train_config.batch_size)
    groups, wall_ms = profile_steps(trainer, batches, args.warmup, device)
    flops = flops_per_image(trainer, batches[0])
    peak = bc.matmul_flops_per_second(device) / 1e9
    text = report(args, env, groups, wall_ms, data_ms, flops, peak, trainer.train_config.batch_size)
    print(text)
    (out / "profile.md").write_text(text)
    payload = {"environment": env, "groups_ms": groups, "wall_ms": wall_ms, "data_ms": data_ms}
    bc.save_json(out / "profile.json", {**payload, "flops_per_image": flops, "matmul_gflops": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
