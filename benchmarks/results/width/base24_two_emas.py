"""Record of the one-off CPU run behind README "Width", 24-channel row (2026-11-27, 2-core CPU).

The CPU recipe with base_channels=--base, trained for 15 minutes, with a second EMA (--ema2) updated
after every step beside the recipe's 0.998; both scored at --marks minutes on 256 DDPM-100 samples
(the sampling seed of benchmarks/time_to_quality.py). Kept with its output, not maintained. It ran
from a folder one level below the repo root (its sys.path lines then said parents[1]), with the
module of commit 2e97d05, as:
    python ema_width.py --base 24 --ema2 0.999 --out base24_two_emas.json
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import _common as bc

import diffusion_utils as du

p = argparse.ArgumentParser()
p.add_argument("--base", type=int, default=24)
p.add_argument("--ema2", type=float, default=0.999)
p.add_argument("--marks", default="5,10,15")
p.add_argument("--samples", type=int, default=256)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(2)
mc, tc = du.default_configs("cpu")
mc = dataclasses.replace(mc, base_channels=a.base)
tc = dataclasses.replace(tc, batch_size=a.batch, lr=a.lr)
tr = du.Trainer(mc, tc, device="cpu")
ema2 = du.EMA(tr.model, a.ema2)
step = tr.train_step


def both(x0):
    loss = step(x0)
    ema2.update(tr.model)
    return loss


tr.train_step = both
print(f"base {a.base}: {du.count_parameters(tr.model):,} params; batch {a.batch} lr {a.lr}; EMA {tc.ema_decay} and {a.ema2}", flush=True)
rows, trained, prev = [], 0.0, 0.0
for mark in [float(m) for m in a.marks.split(",")]:
    t0 = time.perf_counter()
    tr.train(minutes=mark - prev, progress=False)
    trained += time.perf_counter() - t0
    prev = mark
    for name, net in [(f"ema {tc.ema_decay}", tr.sampling_model), (f"ema {a.ema2}", ema2.model)]:
        m, _ = bc.sample_and_evaluate(net, tr.schedule, a.samples, "ddpm", 100, torch.device("cpu"))
        row = {
            "minutes": mark,
            "weights": name,
            "steps": tr.step,
            "images": tr.images_seen,
            **{k: m[k] for k in ("valid", "mid_gray", "circle_share", "size_w1", "position_w1")},
        }
        rows.append(row)
        print(row, flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
