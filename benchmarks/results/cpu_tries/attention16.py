"""Record of a one-off experiment (2026-11-27), kept beside its output; not a maintained tool.

The CPU recipe with base_channels=16 plus one self-attention layer after the 16x16 decoder
level, trained for 15 minutes and scored on 512 DDPM-100 samples (sampling seed 7).
Run from the repository root: python benchmarks/results/cpu_tries/attention16.py 16 1 15 out.json
"""

import dataclasses
import json
import sys

import torch
from torch import nn

sys.path.insert(0, ".")
import diffusion_utils as du  # noqa: E402

torch.set_num_threads(2)
base, heads, minutes, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]


class LevelAttention(nn.Module):
    """A decoder 'block' that only attends: called as block(h, time) like the residual blocks."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.attention = du.SelfAttention(channels, heads)

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.attention(h)


original_init = du.UNet.__init__


def patched_init(self, config=None):
    original_init(self, config)
    self.up_blocks[-1].append(LevelAttention(self.config.base_channels * self.config.channel_mults[0], heads))


du.UNet.__init__ = patched_init

model_config, train_config = du.default_configs("cpu")
trainer = du.Trainer(dataclasses.replace(model_config, base_channels=base), train_config, device="cpu")
print(du.describe_model(trainer.model), flush=True)
trainer.train(minutes=minutes, progress=False)
result = du.sample(trainer.sampling_model, trainer.schedule, 512, steps=100, seed=7, progress=False)
scores = du.evaluate_samples(result.images)
scores.update(images_seen=trainer.images_seen, steps=trainer.step)
print(json.dumps(scores))
with open(out, "w") as file:
    json.dump(scores, file)
du.plot_grid(result.images[:32], title=f"b{base} +attn16 heads {heads}").savefig(out.replace(".json", ".png"), dpi=80)
