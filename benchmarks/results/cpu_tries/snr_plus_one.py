"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

The recipe with one change to the loss weighting of v-prediction. In x_0 terms min-SNR-gamma
weights a timestep by min(SNR, gamma): at the noisiest steps (SNR -> 0) that weight goes to 0.
Plain v weights by SNR + 1, which is 1 there. This run weights by min(SNR + 1, gamma): capped like
min-SNR at low noise, like plain v at high noise. As a weight on the v loss:
min(SNR + 1, gamma) / (SNR + 1) instead of min(SNR, gamma) / (SNR + 1).
Since then this is the module's min_snr_form="cap" (the default), so today the same run is
python benchmarks/time_to_quality.py --configs recipe --min-snr-form cap ...; this script
patches the weight only as a record of how the first run was made.
Run from the repository root, with time_to_quality.py's arguments:
python benchmarks/results/cpu_tries/snr_plus_one.py --configs recipe --minutes 15 --eval-at 10,15 --samples 512 --out OUT
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import time_to_quality  # noqa: E402

import diffusion_utils as du  # noqa: E402


def snr_plus_one_weight(self, prediction: str, t: torch.Tensor, min_snr_gamma: float | None, min_snr_form: str = "cap") -> torch.Tensor:
    if prediction != "v" or min_snr_gamma is None or min_snr_form != "cap":
        raise ValueError("this experiment is for v-prediction with a gamma")
    snr = self.gather(self.snr, t, torch.ones(len(t), device=t.device)).flatten()
    return (snr + 1).clamp(max=min_snr_gamma) / (snr + 1)


du.NoiseSchedule.loss_weight = snr_plus_one_weight
sys.exit(time_to_quality.main())
