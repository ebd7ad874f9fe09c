"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

Which EMA decay gives the crispest samples after a 15-minute CPU run? One training run of the
CPU recipe (du.default_configs("cpu")) keeps, besides its own EMA (TrainConfig.ema_decay), more
EMAs of the same weights with other decays (du.EMA, same warm-up), updated after every step. At
the end each EMA, and the raw weights, draws the same --samples images (DDPM 100 steps, the
sampling seed of time_to_quality.py), scored by du.evaluate_samples. One run, so every decay
sees exactly the same training trajectory.
Run from the repository root:
python benchmarks/results/cpu_tries/ema_decays.py --minutes 15 --out OUT
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
parser.add_argument("--samples", type=int, default=512)
parser.add_argument("--decays", default="0.995,0.999,0.9995", help="extra EMA decays, besides the recipe's own")
parser.add_argument("--out", default="runs/exp/ema_decays")
parser.add_argument("--threads", type=int, default=2)
bc.add_model_override_args(parser)
args = parser.parse_args()
torch.set_num_threads(args.threads)
out = bc.prepare_out(args.out)

model_config, train_config = bc.apply_overrides(*du.default_configs("cpu"), args)
trainer = du.Trainer(model_config, train_config, device="cpu")
extra = {float(d): du.EMA(trainer.model, float(d)) for d in args.decays.split(",")}
own_step = trainer.train_step


def train_step_with_extra_emas(x0: torch.Tensor) -> torch.Tensor:
    loss = own_step(x0)
    for ema in extra.values():
        ema.update(trainer.model)
    return loss


trainer.train_step = train_step_with_extra_emas
start = time.perf_counter()
trainer.train(minutes=args.minutes, progress=False)
trained = time.perf_counter() - start
print(f"{train_config}\ntrained {trained:.0f} s, {trainer.step} steps, {trainer.images_seen:,} images", flush=True)

models = {"raw weights": trainer.model, f"EMA {train_config.ema_decay} (the recipe's)": trainer.ema.model}
models.update({f"EMA {d}": ema.model for d, ema in extra.items()})
rows = []
for name, model in models.items():
    metrics, images = bc.sample_and_evaluate(model, trainer.schedule, args.samples, "ddpm", 100, trainer.device)
    rows.append({"weights": name, **metrics})
    print(f"{name}: valid {metrics['valid']:.1%}, mid-gray {metrics['mid_gray']:.2%}, share {metrics['circle_share']:.2f}", flush=True)
table = du.markdown_table(
    ["weights", "valid", "mid-gray", "circle share", "size W1", "position W1"],
    [[r["weights"], f"{r['valid']:.1%}", f"{r['mid_gray']:.2%}", f"{r['circle_share']:.2f}", f"{r['size_w1']:.2f}", f"{r['position_w1']:.2f}"] for r in rows],
)
header = f"{bc.environment_line(bc.environment(trainer.device))}\n\n{trainer.images_seen:,} images in {trained:.0f} s; {train_config}"
(out / "ema_decays.md").write_text(f"# EMA decays after one {args.minutes:g}-minute run\n\n{header}\n\n{table}\n")
(out / "ema_decays.json").write_text(json.dumps({"train_config": str(train_config), "images_seen": trainer.images_seen, "rows": rows}, indent=1))
print(table)
