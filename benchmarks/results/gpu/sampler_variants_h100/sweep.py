"""Sampler-variant sweep: which ancestral-sampler details move the circle share / validity."""

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusion_utils as du


@torch.no_grad()
def sample_variant(model, schedule, n, steps, seed=0, variance="tilde", clip=True, batch=256, spacing="linspace"):
    device = next(model.parameters()).device
    if spacing == "linspace":
        spaced = schedule.respaced(steps)
    else:  # quad_high: t = (1 - (1 - u)^2) (T - 1), more steps at high noise; quad_low: t = u^2 (T - 1), more at low noise
        T = len(schedule)
        u = torch.linspace(0, 1, steps, dtype=torch.float64)
        if spacing == "quad_high":
            kept = ((1 - (1 - u) ** 2) * (T - 1)).round().long()
        else:
            kept = (u**2 * (T - 1)).round().long()
        kept = torch.unique(kept)
        ab = schedule.alpha_bars[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        spaced = du.NoiseSchedule(1 - ab / prev, timesteps=schedule.timesteps[kept])
        steps = len(kept)
    model_t = spaced.timesteps.to(device)
    precision = du.choose_precision(device)
    model.eval()
    out = torch.empty(n, 1, 64, 64)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        gens = [torch.Generator(device).manual_seed(seed * 1_000_003 + k) for k in range(start, stop)]
        x = next(du._noise_per_image(gens, device, 1))
        noises = du._noise_per_image(gens, device, steps - 1)
        for s in range(steps):
            i = steps - 1 - s
            t = torch.full((stop - start,), i, device=device, dtype=torch.long)
            with du.autocast_for(device, precision):
                o = model(x, model_t[t]).float()
            x0 = spaced.predict_x0(model.config.prediction, x, o, t)
            if clip:
                x0 = x0.clamp(-1, 1)
            mean = float(spaced.posterior_mean_coef1[i]) * x0 + float(spaced.posterior_mean_coef2[i]) * x
            if i > 0:
                var = float(spaced.posterior_variance[i]) if variance == "tilde" else float(spaced.betas[i])
                mean = mean + math.sqrt(var) * next(noises)
            x = mean
        out[start:stop] = x.clamp(-1, 1).cpu()
    return out


def run_sweep(model, schedule, n, variants, seed=0, out=None, batch=512):
    dev = next(model.parameters()).device
    rows = []
    print("| variant | n | s | valid | mid-gray | circle share | size W1 | pos W1 |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for v in variants:
        parts = v.split(":")
        kind, steps, var, clip = parts[:4]
        spacing = parts[4] if len(parts) > 4 else "linspace"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if var == "module":
            imgs = du.sample(model, schedule, n, steps=int(steps), sampler=kind, seed=seed, progress=False, batch_size=batch).images
        else:
            imgs = sample_variant(model, schedule, n, int(steps), seed=seed, variance=var, clip=clip == "clip", spacing=spacing, batch=batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        m = du.evaluate_samples(imgs)
        m.update(variant=v, seconds=sec)
        rows.append(m)
        print(
            f"| {v} | {n} | {sec:.1f} | {m['valid']:.1%} | {m['mid_gray']:.2%} | {m['circle_share']:.3f} | {m['size_w1']:.2f} | {m['position_w1']:.2f} |",
            flush=True,
        )
        if out:
            Path(out, "sweep.json").write_text(json.dumps(rows, indent=1))
    return rows
