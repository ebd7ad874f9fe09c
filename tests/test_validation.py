"""Input validation of the public functions: clear TypeError / ValueError naming the bad value.

Property tests generate the bad inputs; every message must contain the offending value.
"""

import math
import re

import numpy as np
import pytest
import torch
from helpers import Oracle, tiny_model_config, tiny_train_config
from hypothesis import given
from hypothesis import strategies as st

import diffusion_utils as du

T = 1000
SCHEDULE = du.NoiseSchedule.create("cosine", T)
X0 = torch.zeros(1, 1, 64, 64)
ORACLE = Oracle(SCHEDULE, X0, "eps")  # validation happens before the model is ever called

non_positive = st.integers(min_value=-(10**9), max_value=0)
outside_timesteps = st.one_of(st.integers(-(10**12), -1), st.integers(T, 10**12))


def contains(text: str):
    return re.escape(text)


# ------------------------------------------------------------------------------------------
# validate_images
# ------------------------------------------------------------------------------------------


@st.composite
def bad_image_shapes(draw) -> tuple[int, ...]:
    """A shape near (N, 1, 64, 64) that is not one: a dimension changed, dropped or added, or N = 0."""
    shape = [draw(st.integers(0, 3)), 1, 64, 64]
    change = draw(st.sampled_from(["resize", "drop", "add"]))
    if change == "resize":
        axis = draw(st.integers(1, 3))
        shape[axis] = draw(st.integers(0, 70).filter(lambda v, old=shape[axis]: v != old))
    elif change == "drop":
        del shape[draw(st.integers(0, 3))]
    else:
        shape.insert(draw(st.integers(0, 4)), draw(st.integers(1, 3)))
    return tuple(shape)


@given(shape=bad_image_shapes())
def test_validate_images_names_a_wrong_shape(shape):
    with pytest.raises(ValueError, match=contains(f"got {shape}")):
        du.validate_images(torch.zeros(shape))


@given(
    value=st.one_of(st.floats(1.001, 1e30), st.floats(-1e30, -1.001), st.sampled_from([math.nan, math.inf, -math.inf])),
    index=st.tuples(st.integers(0, 1), st.integers(0, 63), st.integers(0, 63)),
)
def test_validate_images_names_a_value_out_of_range(value, index):
    images = torch.zeros(2, 1, 64, 64)
    images[index[0], 0, index[1], index[2]] = value
    shown = f"{float(torch.tensor(value, dtype=torch.float32)):.7g}"
    with pytest.raises(ValueError, match=contains("[-1, 1]") + ".*" + contains(shown)):
        du.validate_images(images)
    du.validate_images(images, check_range=False)  # the range check can be skipped


def test_validate_images_tolerates_rounding_but_not_more():
    images = torch.zeros(1, 1, 64, 64)
    images[0, 0, 0, 0] = 1.00005
    du.validate_images(images)
    images[0, 0, 0, 0] = 1.0002
    with pytest.raises(ValueError, match=r"got values in \[0, 1\.0002\]"):
        du.validate_images(images)


@given(dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]))
def test_validate_images_refuses_integer_tensors(dtype):
    with pytest.raises(TypeError, match=contains(f"got dtype {dtype}")):
        du.validate_images(torch.zeros(1, 1, 64, 64, dtype=dtype))


@given(value=st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.floats(), max_size=3)))
def test_validate_images_refuses_non_tensors(value):
    with pytest.raises(TypeError, match=contains(f"got {type(value).__name__}")):
        du.validate_images(value)


def test_validate_images_refuses_numpy_arrays():
    with pytest.raises(TypeError, match="got ndarray"):
        du.validate_images(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"got \(1, 64, 64\)"):
        du.model_to_uint8(torch.zeros(1, 64, 64))


# ------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------


@given(t=outside_timesteps)
def test_add_noise_names_a_timestep_out_of_range(t):
    with pytest.raises(ValueError, match=contains(f"timesteps must be in [0, {T - 1}], got values in [{t}, {t}]")):
        SCHEDULE.add_noise(X0, X0, torch.tensor([t]))


@given(t=st.floats(0, T - 1))
def test_add_noise_refuses_float_timesteps(t):
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        SCHEDULE.add_noise(X0, X0, torch.tensor([t]))


def test_add_noise_refuses_other_bad_timesteps():
    with pytest.raises(TypeError, match="integer tensor"):
        SCHEDULE.add_noise(X0, X0, [3])
    with pytest.raises(ValueError, match=r"x0 \(1, 1, 64, 64\), noise \(1, 1, 64, 64\) and t \(2\) must match"):
        SCHEDULE.add_noise(X0, X0, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"noise \(2, 1, 64, 64\)"):
        SCHEDULE.add_noise(X0, torch.zeros(2, 1, 64, 64), torch.tensor([3]))
    assert SCHEDULE.add_noise(X0, X0, torch.tensor([3], dtype=torch.int32)).shape == X0.shape


@given(steps=st.one_of(non_positive, st.integers(T + 1, 10**9)))
def test_respaced_names_a_bad_step_count(steps):
    with pytest.raises(ValueError, match=contains(f"got {steps}")):
        SCHEDULE.respaced(steps)


@given(kind=st.text(max_size=8).filter(lambda k: k not in du.SCHEDULES), timesteps=st.integers(1, 50))
def test_create_names_an_unknown_schedule(kind, timesteps):
    with pytest.raises(ValueError, match=contains(f"unknown schedule {kind!r}; choose one of linear, cosine")):
        du.NoiseSchedule.create(kind, timesteps)


@given(timesteps=non_positive)
def test_create_names_a_bad_length(timesteps):
    with pytest.raises(ValueError, match=contains(f"timesteps must be a positive integer, got {timesteps}")):
        du.NoiseSchedule.create("linear", timesteps)


# ------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------


@given(
    field=st.sampled_from(["num_timesteps", "base_channels", "blocks_per_level", "attention_heads"]), value=non_positive
)
def test_model_config_names_a_non_positive_integer(field, value):
    with pytest.raises(ValueError, match=contains(f"{field} must be a positive integer, got {value}")):
        du.ModelConfig(**{field: value})


@given(field=st.sampled_from(["schedule", "prediction", "time_injection"]), value=st.text(max_size=10))
def test_model_config_names_an_unknown_choice(field, value):
    choices = {"schedule": du.SCHEDULES, "prediction": du.PREDICTIONS, "time_injection": du.TIME_INJECTIONS}[field]
    if value in choices:
        return
    with pytest.raises(ValueError, match=contains(f"unknown {field} {value!r}")):
        du.ModelConfig(**{field: value})


@given(value=st.integers(-100, 100).filter(lambda v: v not in (1, 2, 4)))
def test_model_config_names_a_bad_pixel_unshuffle(value):
    with pytest.raises(ValueError, match=contains(f"pixel_unshuffle must be 1, 2 or 4, got {value}")):
        du.ModelConfig(pixel_unshuffle=value)


@given(value=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(math.nan)))
def test_model_config_names_a_bad_dropout(value):
    with pytest.raises(ValueError, match=contains(f"dropout must be in [0, 1), got {value}")):
        du.ModelConfig(dropout=value)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"base_channels": 20, "attention_heads": 8},
            "base_channels must be a multiple of attention_heads (8), got 20",
        ),
        ({"text_width": 20, "attention_heads": 8}, "text_width must be a multiple of attention_heads (8), got 20"),
        ({"text_width": 36, "attention_heads": 4}, "text_width / attention_heads must be even with rotary positions"),
    ],
)
def test_model_config_names_widths_its_heads_do_not_divide(changes, message):
    with pytest.raises(ValueError, match=contains(message)):
        du.ModelConfig(**changes)
    assert du.ModelConfig(**{**changes, "attention_heads": 2}).attention_heads == 2  # 2 divides them, in even parts


@given(mults=st.lists(st.integers(-3, 0), min_size=1, max_size=3))
def test_model_config_names_bad_channel_mults(mults):
    with pytest.raises(ValueError, match=contains(f"channel_mults must be positive integers, got {tuple(mults)}")):
        du.ModelConfig(channel_mults=tuple(mults))


@given(field=st.sampled_from(["batch_size", "log_every"]), value=non_positive)
def test_train_config_names_a_non_positive_integer(field, value):
    with pytest.raises(ValueError, match=contains(f"{field} must be a positive integer, got {value}")):
        du.TrainConfig(**{field: value})


@given(
    field_value=st.one_of(
        st.tuples(st.just("lr"), st.one_of(st.floats(max_value=0), st.just(math.nan))),
        st.tuples(st.just("warmup_steps"), st.integers(max_value=-1)),
        st.tuples(st.just("min_snr_gamma"), st.floats(max_value=0)),
        st.tuples(st.just("ema_decay"), st.one_of(st.floats(max_value=0), st.floats(min_value=1))),
        st.tuples(st.just("data_workers"), st.integers(max_value=-1)),
    )
)
def test_train_config_names_a_bad_value(field_value):
    field, value = field_value
    with pytest.raises(
        ValueError,
        match=contains(field) + ".*" + contains(f"got {value!r}" if field == "data_workers" else f"got {value}"),
    ):
        du.TrainConfig(**{field: value})


def test_train_config_names_an_unknown_min_snr_form():
    with pytest.raises(ValueError, match=contains("unknown min_snr_form 'x0'; choose one of cap, paper")):
        du.TrainConfig(min_snr_form="x0")


def test_configs_accept_their_documented_none_values():
    config = du.TrainConfig(min_snr_gamma=None, ema_decay=None, warmup_steps=0)
    assert config.min_snr_gamma is None and config.ema_decay is None
    assert du.ModelConfig(channel_mults=[1, 2]).channel_mults == (1, 2)  # lists become tuples


# ------------------------------------------------------------------------------------------
# Dataset, sampling and training entry points
# ------------------------------------------------------------------------------------------


@given(n=st.one_of(non_positive, st.floats(0.5, 10), st.booleans()))
def test_make_shapes_names_a_bad_count(n):
    with pytest.raises(ValueError, match=contains(f"n must be a positive integer, got {n!r}")):
        du.make_shapes(n)


@given(field=st.sampled_from(["n", "steps", "batch_size"]), value=non_positive)
def test_sample_names_a_non_positive_count(field, value):
    kwargs = {"n": 1, "steps": 2, "batch_size": 4, field: value}
    with pytest.raises(ValueError, match=contains(f"{field} must be a positive integer, got {value}")):
        du.sample(ORACLE, SCHEDULE, prediction="eps", progress=False, **kwargs)


@given(sampler=st.text(max_size=8).filter(lambda s: s not in du.SAMPLERS))
def test_sample_names_an_unknown_sampler(sampler):
    with pytest.raises(ValueError, match=contains(f"unknown sampler {sampler!r}; choose one of ddpm, ddim")):
        du.sample(ORACLE, SCHEDULE, 1, steps=2, sampler=sampler, prediction="eps", progress=False)


@given(eta=st.floats(allow_nan=False).filter(lambda e: e != 1.0))
def test_sample_refuses_eta_for_ddpm(eta):
    with pytest.raises(
        ValueError, match=contains(f"eta applies to the ddim sampler only (ddpm is ddim with eta=1), got eta={eta}")
    ):
        du.sample(ORACLE, SCHEDULE, 1, steps=2, sampler="ddpm", eta=eta, prediction="eps", progress=False)


@given(eta=st.floats(max_value=-1e-12))
def test_sample_refuses_negative_eta(eta):
    with pytest.raises(ValueError, match=contains(f"eta must be >= 0, got {eta}")):
        du.sample(ORACLE, SCHEDULE, 1, steps=2, sampler="ddim", eta=eta, prediction="eps", progress=False)


@given(steps=st.integers(1, 20), data=st.data())
def test_sample_names_save_at_steps_out_of_range(steps, data):
    bad = data.draw(st.lists(st.one_of(st.integers(-50, -1), st.integers(steps, steps + 50)), min_size=1, max_size=3))
    good = data.draw(st.lists(st.integers(0, steps - 1), max_size=2))
    with pytest.raises(ValueError, match=contains(f"save_at steps must be in [0, {steps - 1}], got {bad}")):
        du.sample(
            ORACLE, SCHEDULE, 1, steps=steps, save_at=good + bad, sampler="ddim", prediction="eps", progress=False
        )


def test_sample_names_other_bad_arguments():
    with pytest.raises(ValueError, match=r"steps=1001 needs 1001 timesteps of ddim, more than the 1000 of training"):
        du.sample(ORACLE, SCHEDULE, 1, steps=T + 1, sampler="ddim", prediction="eps", progress=False)
    with pytest.raises(ValueError, match=r"unknown prediction 'score'"):
        du.sample(ORACLE, SCHEDULE, 1, steps=2, prediction="score", progress=False)
    with pytest.raises(ValueError, match=r"prediction \('eps' or 'v'\) must be given"):
        du.sample(ORACLE, SCHEDULE, 1, steps=2, progress=False)


@pytest.fixture(scope="module")
def trainer():
    return du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")


def test_train_needs_a_budget(trainer):
    with pytest.raises(ValueError, match="give a training budget: steps or minutes"):
        trainer.train(progress=False)


@given(steps=non_positive)
def test_train_names_bad_steps(trainer, steps):
    with pytest.raises(ValueError, match=contains(f"steps must be a positive integer, got {steps}")):
        trainer.train(steps=steps, progress=False)


@given(minutes=st.one_of(st.floats(max_value=0), st.just(math.nan)))
def test_train_names_bad_minutes(trainer, minutes):
    with pytest.raises(ValueError, match=contains(f"minutes must be > 0, got {minutes}")):
        trainer.train(minutes=minutes, progress=False)


@given(every=non_positive)
def test_train_names_a_bad_checkpoint_interval(trainer, every):
    with pytest.raises(ValueError, match=contains(f"checkpoint_every must be a positive integer, got {every}")):
        trainer.train(steps=1, checkpoint_every=every, progress=False)


def test_nothing_ran_after_the_refusals(trainer):
    assert trainer.step == 0 and trainer.losses == []


@given(batch_size=non_positive)
def test_training_batches_name_a_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=contains(f"batch_size must be a positive integer, got {batch_size}")):
        next(du.training_batches(batch_size))
