"""Record of the one-off device run behind README "Quality at the issue's 3-minute budget", run A (2026-11-27, H100).

Train the CUDA recipe for 3 min (evaluating at --marks), then the sampler sweep of sweep.py on the final model.
Kept with its output (run.log, ttq.json, sweep.json), not maintained. It ran from a folder one level below the
repo root (so its sys.path line then said parents[1]), with the repo's 2e97d05 code, as:
    PYTHONUNBUFFERED=1 python3 gpu_run.py --out $OUT
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))  # the repo root, for diffusion_utils
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import run_sweep

import diffusion_utils as du

p = argparse.ArgumentParser()
p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
p.add_argument("--marks", default="60,120,180")
p.add_argument("--eval-n", type=int, default=512)
p.add_argument("--sweep-n", type=int, default=1024)
p.add_argument("--smoke", action="store_true")
p.add_argument(
    "--variants",
    default="ddpm:100:module:clip,ddpm:100:beta:clip,ddpm:100:tilde:noclip,ddpm:100:tilde:clip:quad_high,ddpm:100:tilde:clip:quad_low,ddpm:250:tilde:clip,ddpm:1000:tilde:clip,ddpm:500:tilde:clip,ddpm:250:beta:clip,ddim:50:module:clip,ddim:100:module:clip",
)
a = p.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
dev = du.pick_device()
mc, tc = du.default_configs(dev)
if a.smoke:
    mc = dataclasses.replace(mc, base_channels=8)
    tc = dataclasses.replace(tc, batch_size=8)
trainer = du.Trainer(mc, tc, dev)
print(
    f"{torch.cuda.get_device_name() if dev.type == 'cuda' else dev} torch {torch.__version__} precision {trainer.precision} params {du.count_parameters(trainer.model):,}",
    flush=True,
)
rows, trained = [], 0.0
print("| training s | steps | images | valid | mid-gray | circle share | size W1 | pos W1 | sample s |", flush=True)
for mark in [float(m) for m in a.marks.split(",")]:
    t0 = time.perf_counter()
    trainer.train(minutes=(mark - trained) / 60, progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    trained += time.perf_counter() - t0
    t1 = time.perf_counter()
    imgs = du.sample(trainer.sampling_model, trainer.schedule, a.eval_n, steps=100, seed=0, progress=False, batch_size=512).images
    s = time.perf_counter() - t1
    m = du.evaluate_samples(imgs)
    m.update(train_seconds=trained, steps=trainer.step, images=trainer.images_seen, sample_seconds=s)
    rows.append(m)
    print(
        f"| {trained:.0f} | {trainer.step} | {trainer.images_seen:,} | {m['valid']:.1%} | {m['mid_gray']:.2%} | {m['circle_share']:.3f} | {m['size_w1']:.2f} | {m['position_w1']:.2f} | {s:.1f} |",
        flush=True,
    )
    (out / "ttq.json").write_text(json.dumps(rows, indent=1))
    if trainer.step and mark == float(a.marks.split(",")[0]):
        torch.save(
            {"model_config": dataclasses.asdict(mc), "ema": {k: v.half().cpu() for k, v in trainer.sampling_model.state_dict().items()}},
            out / f"ema_fp16_{int(mark)}s.pt",
        )
torch.save(
    {"model_config": dataclasses.asdict(mc), "ema": {k: v.half().cpu() for k, v in trainer.sampling_model.state_dict().items()}}, out / "ema_fp16_final.pt"
)
print("sweep on the final model", flush=True)
run_sweep(trainer.sampling_model, trainer.schedule, a.sweep_n, a.variants.split(","), out=out)
