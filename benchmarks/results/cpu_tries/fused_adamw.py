"""AdamW's fused kernel against PyTorch's CPU default (a loop over the tensors, foreach=False),
for the 24-channel recipe: one optimiser step alone, then whole training steps alternating (run from the repository root)."""

import os
import statistics as st
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import diffusion_utils as du

torch.set_num_threads(2)


def run(fused, seconds=40):
    m, t = du.default_configs("cpu")
    tr = du.Trainer(m, t, "cpu")
    kernel = {"fused": True} if fused else {"foreach": False}
    tr.optimizer = torch.optim.AdamW(tr.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **kernel)
    tr.lr_schedule = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda k: 1.0)
    b = tr.batches()
    for _ in range(10):
        tr.train_step(next(b))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tr.train_step(next(b))
        n += 1
    return n * 32 / (time.perf_counter() - t0)


def opt_only(fused):
    m, t = du.default_configs("cpu")
    model = du.UNet(m)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    o = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if fused else {"foreach": False}))
    for _ in range(20):
        o.step()
    t0 = time.perf_counter()
    for _ in range(200):
        o.step()
    return (time.perf_counter() - t0) / 200 * 1e3


print(f"optimizer step only: loop {opt_only(False):.2f} ms, fused {opt_only(True):.2f} ms")
res = {False: [], True: []}
for f in (False, True) * 4:
    res[f].append(run(f, 25))
    print(f"fused={f}: {res[f][-1]:.0f} img/s", flush=True)
print("median loop", st.median(res[False]), "fused", st.median(res[True]), "ratio", st.median(res[True]) / st.median(res[False]))
