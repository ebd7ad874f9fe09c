"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

torch.compile on a 2-core CPU: the CPU recipe's training speed, eager against compiled,
alternating. Run from the repository root: python benchmarks/results/cpu_tries/compile_cpu.py
"""

import dataclasses
import sys
import time

import torch

sys.path.insert(0, ".")
import diffusion_utils as du  # noqa: E402

torch.set_num_threads(2)
model_config, train_config = du.default_configs("cpu")
for compile_ in (False, True, False, True):
    trainer = du.Trainer(model_config, dataclasses.replace(train_config, compile=compile_), device="cpu")
    started = time.perf_counter()
    trainer.train(steps=20, progress=False)
    warm = time.perf_counter() - started
    seen, started = trainer.images_seen, time.perf_counter()
    trainer.train(minutes=0.4, progress=False)
    rate = (trainer.images_seen - seen) / (time.perf_counter() - started)
    print(f"compile={compile_}: warm-up 20 steps {warm:.1f} s; {rate:.0f} img/s", flush=True)
