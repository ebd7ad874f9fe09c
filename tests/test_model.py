"""Section 4: the time-conditioned U-Net."""

import math
import re

import pytest
import torch
from helpers import tiny_model_config
from torch import nn

import diffusion_utils as du


def _input(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturb(modules, seed: int = 0) -> None:
    """Give zero-initialised convolutions random weights (they start at zero: blocks = identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _residual_blocks(model: du.UNet) -> dict[str, du.ResidualBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, du.ResidualBlock)}


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("injection", du.TIME_INJECTIONS)
def test_output_shape_equals_input_shape(factor, injection):
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config(pixel_unshuffle=factor, time_injection=injection)).eval()
    x = _input(3)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_bottleneck_attention_keeps_the_shape_and_starts_as_the_identity():
    torch.manual_seed(0)
    attention = du.SelfAttention(16, heads=4)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(attention(x), x)  # zero-initialised output projection: x + 0
    _perturb([attention.out])
    assert not torch.allclose(attention(x), x)
    model = du.UNet(tiny_model_config(bottleneck_attention=True)).eval()
    assert isinstance(model.mid_attention, du.SelfAttention)
    assert isinstance(du.UNet(tiny_model_config()).mid_attention, nn.Identity)
    with torch.no_grad():
        assert model(_input(2), torch.tensor([3, 900])).shape == (2, 1, 64, 64)


def test_attention_mixes_every_position_with_every_other():
    """Unlike a 3x3 conv, one attention layer lets a change in one corner reach the opposite one."""
    torch.manual_seed(0)
    attention = du.SelfAttention(8, heads=2)
    _perturb([attention.qkv, attention.out])
    x = torch.randn(1, 8, 8, 8)
    changed = x.clone()
    changed[..., 0, 0] += 5.0
    with torch.no_grad():
        difference = (attention(changed) - attention(x)).abs()
    assert difference[..., 7, 7].max() > 1e-4


def test_output_shape_with_two_blocks_per_level_and_three_levels():
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config(channel_mults=(1, 2, 2), blocks_per_level=2)).eval()
    with torch.no_grad():
        assert model(_input(1), torch.tensor([3])).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("injection", du.TIME_INJECTIONS)
def test_output_depends_on_t_once_the_zero_initialised_convs_are_not_zero(injection):
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config(time_injection=injection)).eval()
    x = _input(1).expand(2, -1, -1, -1)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        before = model(x, t)
        # every block's second conv starts at zero, so at initialisation time has no effect yet
        assert torch.equal(before[0], before[1])
        _perturb([block.conv2 for block in _residual_blocks(model).values()])
        after = model(x, t)
    assert (after[0] - after[1]).abs().max() > 1e-3
    assert (after - before).abs().max() > 1e-3


def test_in_bottleneck_mode_time_enters_only_the_mid_blocks():
    torch.manual_seed(0)
    model = du.UNet(tiny_model_config(time_injection="bottleneck")).eval()
    blocks = _residual_blocks(model)
    assert {name for name, block in blocks.items() if block.time_proj is not None} == {"mid_blocks.0", "mid_blocks.1"}
    x = _input(1).expand(2, -1, -1, -1)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        _perturb([block.conv2 for name, block in blocks.items() if not name.startswith("mid")])
        out = model(x, t)
        assert torch.equal(out[0], out[1])  # encoder/decoder blocks do not see t
        _perturb([block.conv2 for name, block in blocks.items() if name.startswith("mid")], seed=1)
        out = model(x, t)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_in_every_block_mode_every_residual_block_gets_time():
    model = du.UNet(tiny_model_config(time_injection="every_block"))
    blocks = _residual_blocks(model)
    assert len(blocks) == 6  # 2 encoder + 2 mid + 2 decoder
    assert all(block.time_proj is not None for block in blocks.values())


def test_parameter_counts_match_a_hand_count():
    """base 8, mults (1, 2), 1 block per level, 2x2 pixel-unshuffle, time_dim = 32. Per module:

    Conv2d(i, o, k): i*o*k*k + o;  Linear(i, o): i*o + o;  GroupNorm(c): 2c.
    ResidualBlock(i, o): norm1 2i + conv1 (9io + o) + time (32o + o) + norm2 2o + conv2 (9o^2 + o)
                         + skip (io + o if i != o).
    time MLP 8->32->32: 288 + 1056 = 1344        stem Conv(4, 8): 296
    down RB(8, 8): 1464     downsample Conv(8, 8, s2): 584     down RB(8, 16): 4208
    mid 2 x RB(16, 16): 2 x 5232 = 10464
    up RB(32, 16): 8096     upsample Conv(16, 8): 1160     up RB(16, 8): 2192
    head GroupNorm(8) + Conv(8, 4): 16 + 292 = 308
    total 30116. Bottleneck mode drops the time projections of the 4 outer blocks:
    Linear(32, 8) twice (264 each) and Linear(32, 16) twice (528 each) = 1584, so 28532.
    """
    every = du.UNet(tiny_model_config(time_injection="every_block"))
    bottleneck = du.UNet(tiny_model_config(time_injection="bottleneck"))
    assert du.count_parameters(every) == 30116
    assert du.count_parameters(bottleneck) == 28532
    assert (
        du.count_parameters(du.UNet(tiny_model_config(pixel_unshuffle=1))) == 30116 - 3 * 8 * 9 - 8 * 3 * 9 - 3
    )  # 1-channel stem and head


def test_residual_block_starts_as_its_skip_connection():
    block = du.ResidualBlock(4, 8, time_dim=16)
    x, time = torch.randn(2, 4, 6, 6), torch.randn(2, 16)
    with torch.no_grad():
        assert torch.allclose(block(x, time), block.skip(x))
    same = du.ResidualBlock(8, 8, time_dim=None)
    assert isinstance(same.skip, nn.Identity) and same.time_proj is None
    x8 = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(same(x8, None), x8)


def test_sinusoidal_embedding_by_hand():
    t = torch.tensor([0, 1, 250])
    emb = du.sinusoidal_embedding(t, 8)  # frequencies 10000^(-k/4), k = 0..3
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expected = [math.cos(250 * w) for w in freqs] + [math.sin(250 * w) for w in freqs]
    assert emb[2].tolist() == pytest.approx(expected, abs=1e-4)
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6) and emb[1, 4].item() == pytest.approx(
        math.sin(1.0), abs=1e-6
    )


def test_describe_model_reports_count_and_levels():
    text = du.describe_model(du.UNet(tiny_model_config()))
    assert "0.03 M parameters" in text
    assert "8x32x32 -> 16x16x16" in text
    assert "time enters every block" in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule", "quadratic"),
        ("prediction", "score"),
        ("time_injection", "nowhere"),
        ("num_timesteps", 0),
        ("num_timesteps", 2.0),
        ("base_channels", -8),
        ("blocks_per_level", 0),
        ("channel_mults", ()),
        ("channel_mults", (1, 0)),
        ("pixel_unshuffle", 3),
        ("dropout", 1.0),
        ("dropout", -0.1),
    ],
)
def test_invalid_model_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        du.ModelConfig(**{field: value})


def test_too_many_levels_are_refused():
    with pytest.raises(
        ValueError,
        match=r"channel_mults \(1, 1, 1, 1, 1, 1\): 6 levels after pixel_unshuffle 2 shrink the image below 2x2",
    ):
        du.ModelConfig(channel_mults=(1, 1, 1, 1, 1, 1), pixel_unshuffle=2)  # 32 -> 1
    du.ModelConfig(channel_mults=(1, 1, 1, 1, 1), pixel_unshuffle=2)  # 32 -> 2 is fine
