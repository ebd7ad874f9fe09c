"""Section 12: SDEdit, inpainting (replacement and RePaint), DDIM inversion, sketches and masks; the edit and inpaint
commands and the image reader they share with evaluate."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from helpers import FlowOracle, Oracle, tiny_model_config
from test_cli import assert_one_line_error, checkpoint, run_main  # noqa: F401  (checkpoint: a module fixture)
from torch import nn

import diffusion_utils as du

SCHEDULE = du.NoiseSchedule.create("cosine", 1000)


@pytest.fixture(scope="module")
def shapes() -> du.ShapeBatch:
    return du.make_shapes(4, seed=11)


@pytest.fixture(scope="module")
def imperfect() -> du.UNet:
    """An untrained tiny U-Net: a model whose estimates are wrong, so what the edit itself does shows."""
    torch.manual_seed(0)
    return du.UNet(tiny_model_config()).eval()


class ConstantEps(nn.Module):
    """A 'network' whose eps_hat is one fixed field whatever x and t: along its ODE eps_hat never changes, so DDIM
    inversion (which takes eps_hat one step early) is exact."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.eps = eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps.expand_as(x)


# ------------------------------------------------------------------------------------------
# SDEdit
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler", list(du.SAMPLERS))
@pytest.mark.parametrize("strength", [0.1, 0.5, 0.9, 1.0])
def test_a_perfect_model_edits_to_the_clean_image_at_any_strength(shapes, prediction, sampler, strength):
    oracle = Oracle(SCHEDULE, shapes.images, prediction)
    options = {"steps": 20, "sampler": sampler, "prediction": prediction, "progress": False}
    result = du.edit(oracle, SCHEDULE, shapes.images, strength, **options)
    torch.testing.assert_close(result.images, shapes.images, atol=1e-5, rtol=0)


def test_the_flow_edits_too(shapes):
    schedule = du.NoiseSchedule.create("flow", 1000)
    result = du.edit(FlowOracle(shapes.images), schedule, shapes.images, 0.5, steps=10, prediction="velocity")
    torch.testing.assert_close(result.images, shapes.images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75])
def test_an_edit_starts_at_the_grid_time_nearest_its_strength_and_walks_down_from_there(shapes, strength):
    oracle = Oracle(SCHEDULE, shapes.images, "eps")
    du.edit(
        oracle,
        SCHEDULE,
        shapes.images,
        strength,
        steps=100,
        sampler="ddim",
        spacing="time",
        prediction="eps",
        progress=False,
    )
    times = [int(t[0]) for t in oracle.seen]
    grid = SCHEDULE.respaced(100).timesteps.tolist()
    assert abs(times[0] - strength * 999) <= 5.5  # the grid's steps are ~10 apart
    assert times == sorted(grid[: grid.index(times[0]) + 1], reverse=True)  # every grid step below, once


def test_strength_one_is_sampling_with_the_same_noise(imperfect, shapes):
    options = {"steps": 5, "seed": 3, "progress": False}
    plain = du.sample(imperfect, SCHEDULE, 4, **options).images
    assert torch.equal(du.edit(imperfect, SCHEDULE, shapes.images, 1.0, **options).images, plain)
    assert not torch.equal(du.edit(imperfect, SCHEDULE, shapes.images, 0.6, **options).images, plain)


def test_an_edit_keeps_more_of_its_input_at_lower_strength(imperfect, shapes):
    errors = [
        (du.edit(imperfect, SCHEDULE, shapes.images, s, steps=10, progress=False).images - shapes.images).abs().mean()
        for s in (0.1, 0.9)
    ]
    assert errors[0] < errors[1]


class Asked(nn.Module):
    """A conditional 'network' that records the requests it is given and answers eps_hat = 0."""

    config = SimpleNamespace(conditional=True, prediction="eps")

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.asked: list[du.Condition | None] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: du.Condition | None = None) -> torch.Tensor:
        self.asked.append(condition)
        return torch.zeros_like(x)


def test_an_edit_and_an_inpainting_pass_a_request_and_guidance_through(shapes):
    model = Asked()
    du.edit(model, SCHEDULE, shapes.images, 0.5, steps=4, condition=du.request(4, "circle"), guidance=2.0)
    du.inpaint(model, SCHEDULE, shapes.images, du.make_masks(shapes), 1, steps=4, condition=du.request(4, "square"))
    labels = [condition.labels.tolist() for condition in model.asked]
    assert labels[0] == [du.CIRCLE] * 4 + [-1] * 4  # guided: the request and the null one, in one batch
    assert labels[-1] == [du.SQUARE] * 4


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, float("nan")])
def test_a_strength_outside_zero_to_one_is_refused(shapes, strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        du.edit(Oracle(SCHEDULE, shapes.images, "eps"), SCHEDULE, shapes.images, strength, prediction="eps")


# ------------------------------------------------------------------------------------------
# Inpainting
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", du.MASK_KINDS)
@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_pixels_bit_for_bit(imperfect, shapes, kind, resample):
    mask = du.make_masks(shapes, kind, seed=2)
    result = du.inpaint(imperfect, SCHEDULE, shapes.images, mask, resample, steps=6, progress=False)
    assert torch.equal(result.images[mask], shapes.images[mask])
    assert not torch.equal(result.images[~mask], shapes.images[~mask])  # the model filled the rest


@pytest.mark.parametrize("sampler", list(du.SAMPLERS))
def test_a_perfect_model_fills_the_hidden_pixels_with_the_image(shapes, sampler):
    mask = du.make_masks(shapes, "half")
    oracle = Oracle(SCHEDULE, shapes.images, "v")
    result = du.inpaint(oracle, SCHEDULE, shapes.images, mask, 2, steps=10, sampler=sampler, prediction="v")
    torch.testing.assert_close(result.images, shapes.images, atol=1e-5, rtol=0)


def test_repaint_takes_each_step_r_times_and_differs_from_replacement(imperfect, shapes):
    mask = du.make_masks(shapes, "box")
    calls = []
    imperfect.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        options = {"steps": 6, "progress": False, "seed": 5}
        replaced = du.inpaint(imperfect, SCHEDULE, shapes.images, mask, 1, **options).images
        assert len(calls) == 6
        repainted = du.inpaint(imperfect, SCHEDULE, shapes.images, mask, 3, **options).images
        assert len(calls) == 6 + 5 * 3 + 1  # every step three times, but the last
    finally:
        imperfect._forward_hooks.clear()
    assert not torch.equal(replaced, repainted)
    assert torch.equal(repainted[mask], replaced[mask])


def test_inpainting_is_the_same_whatever_the_batch_size(imperfect, shapes):
    mask = du.make_masks(shapes, "strokes")
    runs = [
        du.inpaint(imperfect, SCHEDULE, shapes.images, mask, 2, steps=4, batch_size=b, progress=False) for b in (1, 4)
    ]
    torch.testing.assert_close(runs[0].images, runs[1].images, atol=1e-5, rtol=0)


def test_a_mask_that_keeps_everything_or_nothing_is_refused(shapes):
    oracle = Oracle(SCHEDULE, shapes.images, "eps")
    full, empty = torch.ones(1, 1, 64, 64, dtype=torch.bool), torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="the mask keeps every pixel: there is nothing to inpaint"):
        du.inpaint(oracle, SCHEDULE, shapes.images, full, prediction="eps")
    with pytest.raises(ValueError, match="the mask keeps no pixel"):
        du.inpaint(oracle, SCHEDULE, shapes.images, empty, prediction="eps")
    with pytest.raises(ValueError, match=r"mask must have shape \(4 or 1, 1, 64, 64\)"):
        du.inpaint(oracle, SCHEDULE, shapes.images, torch.ones(4, 1, 32, 32, dtype=torch.bool), prediction="eps")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        du.inpaint(oracle, SCHEDULE, shapes.images, torch.ones(1, 1, 64, 64), prediction="eps")


# ------------------------------------------------------------------------------------------
# DDIM inversion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 50])
def test_inversion_then_ddim_decoding_is_exact_when_eps_hat_does_not_change(shapes, steps):
    """On the linear schedule: the cosine one ends at alpha_bar ~ 1e-9, where x0_hat = (x - sigma eps) / alpha
    multiplies float32's rounding by 1e4 and the round trip is only good to ~1e-2."""
    schedule = du.NoiseSchedule.create("linear", 1000)
    eps = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    model = ConstantEps(eps)
    images = shapes.images * 0.9  # inside [-1, 1], so no x0_hat is clipped
    latents = du.invert(model, schedule, images, steps=steps, prediction="eps")
    decoded = du.sample(model, schedule, 4, steps=steps, sampler="ddim", prediction="eps", initial_noise=latents)
    torch.testing.assert_close(decoded.images, images, atol=1e-4, rtol=0)
    # and the noise it finds is the path's own: sqrt(ab) x_0 + sqrt(1 - ab) eps at the last grid index
    ab = float(schedule.alpha_bars[-1])
    torch.testing.assert_close(latents, ab**0.5 * images + (1 - ab) ** 0.5 * eps.expand_as(images), atol=1e-4, rtol=0)


def test_inversion_with_a_perfect_model_round_trips(shapes):
    oracle = Oracle(SCHEDULE, shapes.images, "v")
    latents = du.invert(oracle, SCHEDULE, shapes.images, steps=20, prediction="v")
    decoded = du.sample(oracle, SCHEDULE, 4, steps=20, sampler="ddim", prediction="v", initial_noise=latents)
    torch.testing.assert_close(decoded.images, shapes.images, atol=1e-5, rtol=0)


def test_inversion_walks_the_ddim_grid_upwards(shapes):
    oracle = Oracle(SCHEDULE, shapes.images, "eps")
    du.invert(oracle, SCHEDULE, shapes.images, steps=10, prediction="eps")
    grid = SCHEDULE.respaced(10).timesteps.tolist()
    assert [int(t[0]) for t in oracle.seen] == [grid[0], *grid[:-1]]  # the first from the clean image, at index 0


# ------------------------------------------------------------------------------------------
# Sketches and masks
# ------------------------------------------------------------------------------------------


def test_sketches_are_rough_versions_of_known_shapes():
    sketches, clean = du.make_sketches(64, seed=3), du.make_shapes(64, seed=3)
    assert torch.equal(du.make_sketches(64, seed=3).images, sketches.images)  # reproducible
    np.testing.assert_array_equal(sketches.labels, clean.labels)
    np.testing.assert_array_equal(sketches.centers, clean.centers)
    np.testing.assert_array_equal(sketches.sizes, clean.sizes)
    drawn, intended = sketches.images > 0, clean.images > 0
    assert not torch.equal(drawn, intended)
    box = torch.zeros_like(intended)  # every sketched pixel lies near the intended shape
    for k, ((x, y), size) in enumerate(zip(clean.centers, clean.sizes)):
        reach = 0.75 * size + 2  # a wrong aspect, a tilt, a wobble and a 2 px pen
        top, left = max(0, int(y - reach)), max(0, int(x - reach))
        box[k, 0, top : int(y + reach) + 1, left : int(x + reach) + 1] = True
    assert not (drawn & ~box).any()
    assert du.evaluate_samples(sketches.images)["valid"] < 0.9  # rough: many are no clean shape at all


@pytest.mark.parametrize("kind", du.MASK_KINDS)
def test_masks_hide_part_of_each_shape(shapes, kind):
    batch = du.make_shapes(32, seed=4)
    mask = du.make_masks(batch, kind, seed=1)
    assert mask.dtype == torch.bool and mask.shape == (32, 1, 64, 64)
    shape = batch.images > 0
    hidden = (shape & ~mask).flatten(1).sum(1)
    assert (hidden > 0).all() and (mask.flatten(1).sum(1) > 0).all()
    if kind == "half":
        share = hidden.float() / shape.flatten(1).sum(1)
        assert ((share > 0.3) & (share < 0.7)).all()
    assert torch.equal(du.make_masks(batch, kind, seed=1), mask)


# ------------------------------------------------------------------------------------------
# The image reader and the commands
# ------------------------------------------------------------------------------------------


def write_png(path, image: np.ndarray):
    assert cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize(
    "stored",
    [
        lambda u8: u8,
        lambda u8: u8[0],
        lambda u8: u8[:, None],
        lambda u8: u8.astype(np.float32) / 255,
        lambda u8: u8.astype(np.float64) / 127.5 - 1,
        lambda u8: u8 > 127,
    ],
    ids=["uint8", "one image", "N1HW", "float [0, 1]", "float [-1, 1]", "bool"],
)
def test_the_reader_takes_every_kind_of_npy(tmp_path, stored):
    u8 = du.model_to_uint8(du.make_shapes(3, seed=0).images)
    np.save(tmp_path / "x.npy", stored(u8))
    read = du.read_images(tmp_path / "x.npy")
    expected = u8[:1] if read.shape[0] == 1 else u8
    np.testing.assert_array_equal(read, expected)


def test_the_reader_takes_a_grayscale_png_and_refuses_colour(tmp_path):
    u8 = du.model_to_uint8(du.make_shapes(1, seed=0).images)[0]
    np.testing.assert_array_equal(du.read_images(write_png(tmp_path / "g.png", u8)), u8[None])
    with pytest.raises(ValueError, match="a colour image \\(3 channels\\); the input must be grayscale"):
        du.read_images(write_png(tmp_path / "c.png", np.stack([u8, u8, u8 // 2], -1)))


@pytest.fixture
def files(tmp_path):
    batch = du.make_shapes(2, seed=6)
    images = du.model_to_uint8(batch.images)
    np.save(tmp_path / "in.npy", images)
    np.save(tmp_path / "mask.npy", du.make_masks(batch, "half").squeeze(1).numpy())
    return tmp_path, images


def test_edit_writes_edited_images(checkpoint, files, capsys):  # noqa: F811
    folder, images = files
    out = folder / "out.npy"
    argv = ["edit", "--checkpoint", str(checkpoint), "--input", str(folder / "in.npy"), "--out", str(out)]
    status, stdout, _ = run_main(capsys, *argv, "--strength", "0.5", "--steps", "4", "--no-progress", "--png", "g.png")
    assert status == 0 and f"saved 2 images to {out}" in stdout
    assert np.load(out).shape == (2, 64, 64) and np.load(out).dtype == np.uint8


def test_inpaint_keeps_the_known_pixels_in_the_file(checkpoint, files, capsys):  # noqa: F811
    folder, images = files
    out = folder / "out.npy"
    argv = ["inpaint", "--checkpoint", str(checkpoint), "--input", str(folder / "in.npy"), "--out", str(out)]
    status, _, _ = run_main(capsys, *argv, "--mask", str(folder / "mask.npy"), "--steps", "3", "--no-progress")
    assert status == 0
    keep = np.load(folder / "mask.npy")
    np.testing.assert_array_equal(np.load(out)[keep], images[keep])


@pytest.mark.parametrize(
    ("make", "extra", "fragment"),
    [
        (lambda d: (d / "t.png").write_text("hello") and d / "t.png", [], "not an image OpenCV can read"),
        (lambda d: write_png(d / "s.png", np.zeros((32, 32), np.uint8)), [], "is 32x32 pixels"),
        (lambda d: write_png(d / "c.png", np.zeros((64, 64, 3), np.uint8)), [], "a colour image"),
        (lambda d: np.save(d / "p.npy", np.array([{}], dtype=object)) or d / "p.npy", [], "not a plain .npy array"),
        (lambda d: d / "in.npy", ["--strength", "0"], "strength must be in (0, 1]"),
        (lambda d: d / "in.npy", ["--strength", "1.5"], "strength must be in (0, 1]"),
        (lambda d: d / "missing.png", [], "no such file"),
    ],
    ids=["text", "size", "colour", "pickled", "strength 0", "strength 1.5", "missing"],
)
def test_edit_refuses_bad_input_with_one_line(checkpoint, files, capsys, make, extra, fragment):  # noqa: F811
    folder, _ = files
    out = folder / "out.npy"
    argv = ["edit", "--checkpoint", str(checkpoint), "--input", str(make(folder)), "--out", str(out), *extra]
    assert_one_line_error(*run_main(capsys, *argv)[::2], "edit: error", fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        (np.ones((64, 64), bool), "keeps every pixel"),
        (np.zeros((64, 64), bool), "keeps no pixel"),
        (np.ones((32, 32), bool), "the mask is 32x32 pixels, not the 64x64 of the images"),
        (np.ones((3, 64, 64), bool), "3 masks for 2 images"),
    ],
    ids=["everything", "nothing", "size", "count"],
)
def test_inpaint_refuses_a_bad_mask_with_one_line(checkpoint, files, capsys, mask, fragment):  # noqa: F811
    folder, _ = files
    np.save(folder / "bad.npy", mask)
    out = folder / "out.npy"
    argv = ["inpaint", "--checkpoint", str(checkpoint), "--input", str(folder / "in.npy"), "--out", str(out)]
    assert_one_line_error(*run_main(capsys, *argv, "--mask", str(folder / "bad.npy"))[::2], "inpaint: error", fragment)
    assert not out.exists()


def test_evaluate_reads_a_png_and_floats(tmp_path, capsys):
    u8 = du.model_to_uint8(du.make_shapes(1, seed=0).images)[0]
    for path in (write_png(tmp_path / "one.png", u8), tmp_path / "f.npy"):
        np.save(tmp_path / "f.npy", u8.astype(np.float32) / 255)
        status, out, _ = run_main(capsys, "evaluate", str(path))
        assert status == 0 and '"valid": 1.0' in out
