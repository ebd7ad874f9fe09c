"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

Score saved checkpoints on more samples than the time-to-quality run (less sampling noise),
for each DDPM step count. Run from the repository root:
python benchmarks/results/cpu_tries/rescore_512.py 512 100,250 a.pt b.pt
"""

import sys
import time

import torch

sys.path.insert(0, ".")
import diffusion_utils as du  # noqa: E402

torch.set_num_threads(2)
n, steps_list = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
for checkpoint in sys.argv[3:]:
    model, schedule = du.load_model(checkpoint, device="cpu")
    for steps in steps_list:
        started = time.perf_counter()
        result = du.sample(model, schedule, n, steps=steps, seed=7, progress=False)
        m = du.evaluate_samples(result.images)
        print(
            f"{checkpoint:45s} ddpm-{steps:<4d} n {n} valid {m['valid']:.3f} mid-gray {m['mid_gray']:.4f} share {m['circle_share']:.3f} "
            f"size {m['size_w1']:.2f} pos {m['position_w1']:.2f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
