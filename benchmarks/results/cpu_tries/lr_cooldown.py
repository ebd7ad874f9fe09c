"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

Does a learning-rate cool-down at the end of a wall-clock budget sharpen the edges (fewer
mid-gray pixels) of the CPU recipe? The recipe (du.default_configs("cpu")) trains for --minutes;
over the last --cooldown share of that time the lr falls linearly with the wall clock to
--floor x lr (a warmup-stable-decay schedule, set by time because the budget is in minutes).
Then the EMA weights draw --samples images (DDPM 100 steps, the sampling seed of
time_to_quality.py), scored by du.evaluate_samples. Compare with a run of the recipe without it.
Run from the repository root:
python benchmarks/results/cpu_tries/lr_cooldown.py --minutes 15 --cooldown 0.3 --out OUT
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import _common as bc  # noqa: E402

import diffusion_utils as du  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--minutes", type=float, default=15)
parser.add_argument("--cooldown", type=float, default=0.3, help="share of the budget at the end over which the lr falls")
parser.add_argument("--floor", type=float, default=0.0, help="lr at the very end, as a share of the base lr")
parser.add_argument("--samples", type=int, default=512)
parser.add_argument("--out", default="runs/exp/lr_cooldown")
parser.add_argument("--threads", type=int, default=2)
bc.add_model_override_args(parser)
args = parser.parse_args()
torch.set_num_threads(args.threads)
out = bc.prepare_out(args.out)

model_config, train_config = bc.apply_overrides(*du.default_configs("cpu"), args)
trainer = du.Trainer(model_config, train_config, device="cpu")
budget = args.minutes * 60
own_step = trainer.train_step
start = time.perf_counter()
lr_at_step: list[float] = []


def train_step_with_cooldown(x0: torch.Tensor) -> torch.Tensor:
    left = max(0.0, budget - (time.perf_counter() - start)) / (args.cooldown * budget)  # 1 until the cool-down starts
    scale = args.floor + (1 - args.floor) * min(1.0, left)
    warmup = min(1.0, (trainer.step + 1) / (train_config.warmup_steps + 1))
    for group in trainer.optimizer.param_groups:
        group["lr"] = train_config.lr * warmup * scale  # the Trainer's LambdaLR sets it after the step; this wins before it
    lr_at_step.append(train_config.lr * warmup * scale)
    return own_step(x0)


trainer.train_step = train_step_with_cooldown
trainer.train(minutes=args.minutes, progress=False)
trained = time.perf_counter() - start
print(f"{train_config}\ntrained {trained:.0f} s, {trainer.step} steps, {trainer.images_seen:,} images", flush=True)
metrics, images = bc.sample_and_evaluate(trainer.sampling_model, trainer.schedule, args.samples, "ddpm", 100, trainer.device)
print(
    f"valid {metrics['valid']:.1%}, mid-gray {metrics['mid_gray']:.2%}, share {metrics['circle_share']:.2f}, size W1 {metrics['size_w1']:.2f}, position W1 {metrics['position_w1']:.2f}"
)
print(
    f"lr at steps 0, n/2, 3n/4, last: {lr_at_step[0]:.2e} {lr_at_step[len(lr_at_step) // 2]:.2e} {lr_at_step[3 * len(lr_at_step) // 4]:.2e} {lr_at_step[-1]:.2e}"
)
summary = {
    "args": vars(args),
    "lr_last": lr_at_step[-1],
    "train_config": str(train_config),
    "images_seen": trainer.images_seen,
    "steps": trainer.step,
    **metrics,
}
(out / "lr_cooldown.json").write_text(json.dumps(summary, indent=1, default=str))
du.plot_grid(images[:32], title=f"lr cool-down over the last {args.cooldown:.0%}: valid {metrics['valid']:.0%}").savefig(out / "samples.png")
