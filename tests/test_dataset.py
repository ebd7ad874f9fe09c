"""Section 2: the procedural dataset draws exactly what it claims."""

import math

import numpy as np
import pytest
import torch

import diffusion_utils as du

N = 2000


@pytest.fixture(scope="module")
def batch():
    return du.make_shapes(N, seed=7)


@pytest.fixture(scope="module")
def masks(batch):
    return (batch.images[:, 0] > 0).numpy()  # white pixels


def test_images_are_float32_with_values_exactly_minus_one_or_one(batch):
    assert batch.images.shape == (N, 1, 64, 64)
    assert batch.images.dtype == torch.float32
    assert set(torch.unique(batch.images).tolist()) == {-1.0, 1.0}
    assert len(batch) == N
    assert batch.labels.shape == (N,) and batch.centers.shape == (N, 2) and batch.sizes.shape == (N,)


def test_labels_are_about_half_circles_half_squares(batch):
    assert set(np.unique(batch.labels).tolist()) == {du.CIRCLE, du.SQUARE}
    # binomial(2000, 0.5): standard error 0.011, so 0.05 is > 4 sigma
    assert abs(float(np.mean(batch.labels == du.SQUARE)) - 0.5) < 0.05


def test_sizes_cover_size_range(batch):
    low, high = du.SIZE_RANGE
    circles, squares = batch.sizes[batch.labels == du.CIRCLE], batch.sizes[batch.labels == du.SQUARE]
    assert set(squares.astype(int).tolist()) == set(range(low, high + 1))  # every side, both ends
    assert set(circles.astype(int).tolist()) == set(range(low, high + 1, 2))  # odd diameters 2r + 1
    assert bool((batch.sizes == np.round(batch.sizes)).all())


def test_squares_are_exactly_side_by_side_pixels_at_their_centre(batch, masks):
    for k in np.flatnonzero(batch.labels == du.SQUARE):
        side = int(batch.sizes[k])
        ys, xs = np.nonzero(masks[k])
        assert len(xs) == side * side
        assert xs.max() - xs.min() + 1 == side and ys.max() - ys.min() + 1 == side  # a full block
        assert (xs.mean(), ys.mean()) == pytest.approx(tuple(batch.centers[k]), abs=1e-9)


def test_circles_are_the_pixels_within_radius_of_their_centre(batch, masks):
    """A circle of diameter d = 2r + 1 is exactly the lattice disc (x - cx)^2 + (y - cy)^2 <= r^2."""
    yy, xx = np.mgrid[0:64, 0:64]
    for k in np.flatnonzero(batch.labels == du.CIRCLE):
        d = int(batch.sizes[k])
        r = (d - 1) // 2
        cx, cy = batch.centers[k]
        assert cx == int(cx) and cy == int(cy)  # odd diameter: the centre is a pixel
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        assert np.array_equal(masks[k], disc)
        ys, xs = np.nonzero(masks[k])
        assert xs.max() - xs.min() + 1 == d and ys.max() - ys.min() + 1 == d  # d pixels across
        assert (xs.mean(), ys.mean()) == pytest.approx((cx, cy), abs=1e-9)


def test_circle_area_is_close_to_pi_r_squared(batch, masks):
    # The lattice disc of radius r = (d - 1) / 2 has pi r^2 + O(r) pixels: within 4% for r >= 7,
    # which is 84% to 95% of pi (d / 2)^2 (the single-pixel tips make d = 2r + 1 across).
    for k in np.flatnonzero(batch.labels == du.CIRCLE):
        d = float(batch.sizes[k])
        area = int(masks[k].sum())
        assert area == pytest.approx(math.pi * ((d - 1) / 2) ** 2, rel=0.04)
        assert 0.8 * math.pi * (d / 2) ** 2 < area < math.pi * (d / 2) ** 2


def test_every_shape_stays_margin_pixels_inside_the_frame(masks):
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, 64) each
    m = du.MARGIN
    assert not rows[:, :m].any() and not rows[:, 64 - m :].any()
    assert not cols[:, :m].any() and not cols[:, 64 - m :].any()
    # ...and the margin is tight: some shapes touch each allowed edge row/column
    assert rows[:, m].any() and rows[:, 63 - m].any() and cols[:, m].any() and cols[:, 63 - m].any()


def test_each_image_holds_one_connected_shape(batch, masks):
    import cv2

    for k in range(0, N, 10):
        count, _ = cv2.connectedComponents(masks[k].astype(np.uint8), connectivity=8)
        assert count == 2  # background + the shape


def test_centres_spread_over_the_frame(batch):
    # uniform over the allowed positions: the mean centre sits near the middle, 31.5 px
    assert batch.centers.mean(axis=0) == pytest.approx((31.5, 31.5), abs=1.0)


def test_same_seed_same_images_different_seed_different():
    a, b, c = du.make_shapes(16, seed=3), du.make_shapes(16, seed=3), du.make_shapes(16, seed=4)
    assert torch.equal(a.images, b.images)
    assert (
        np.array_equal(a.labels, b.labels) and np.array_equal(a.centers, b.centers) and np.array_equal(a.sizes, b.sizes)
    )
    assert not torch.equal(a.images, c.images)
    assert torch.equal(du.make_shapes(4, seed=(3, 5)).images, du.make_shapes(4, seed=(3, 5)).images)
    assert not torch.equal(du.make_shapes(4, seed=(3, 5)).images, du.make_shapes(4, seed=(3, 6)).images)


def test_draw_shape_puts_the_centre_of_an_even_square_between_pixels():
    image = du.draw_shape(du.SQUARE, (20, 30), 16)  # x0 = 20 - 7 = 13, so columns 13..28
    ys, xs = np.nonzero(image)
    assert image.dtype == np.uint8 and set(np.unique(image).tolist()) == {0, 255}
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (13, 28, 23, 38)
    assert (xs.mean(), ys.mean()) == (20.5, 30.5)


def test_uint8_conversions_round_trip_exactly():
    values = np.arange(256, dtype=np.uint8)
    images = np.broadcast_to(np.resize(values, 64 * 64).reshape(64, 64), (2, 64, 64)).copy()
    model = du.uint8_to_model(images)
    assert model.shape == (2, 1, 64, 64) and model.dtype == torch.float32
    assert float(model.min()) == -1.0 and float(model.max()) == 1.0
    assert float(model[0].flatten()[128]) == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert np.array_equal(du.model_to_uint8(model), images)


def test_model_to_uint8_clips_values_outside_the_range():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).repeat(64 * 13)[: 64 * 64].view(1, 1, 64, 64)
    out = du.model_to_uint8(x)
    assert out.shape == (1, 64, 64) and out.dtype == np.uint8
    assert out.ravel()[:5].tolist() == [0, 0, 128, 255, 255]  # 0.0 -> 127.5 rounds half to even


# ------------------------------------------------------------------------------------------
# Batches for training
# ------------------------------------------------------------------------------------------


def test_training_batches_give_step_k_the_same_batch_every_time():
    stream = du.training_batches(4, seed=1)
    first = [next(stream) for _ in range(4)]
    assert all(images.shape == (4, 1, 64, 64) for images, _ in first)
    assert torch.equal(first[0][0], du.make_shapes(4, seed=(1, 0)).images)
    assert torch.equal(first[3][0], du.make_shapes(4, seed=(1, 3)).images)
    assert not torch.equal(first[0][0], first[1][0])
    resumed = du.training_batches(4, seed=1, start_step=2)
    assert torch.equal(next(resumed)[0], first[2][0]) and torch.equal(next(resumed)[0], first[3][0])
    assert not torch.equal(next(du.training_batches(4, seed=2))[0], first[0][0])


def test_each_training_batch_carries_what_was_drawn_in_it():
    images, condition = next(du.training_batches(6, seed=4, start_step=1))
    drawn = du.make_shapes(6, seed=(4, 1))
    assert torch.equal(images, drawn.images)
    assert condition.labels.tolist() == drawn.labels.tolist()
    assert condition.centers.tolist() == drawn.centers.tolist() and condition.sizes.tolist() == drawn.sizes.tolist()
    assert all(bool(mask.all()) for mask in condition.given().values())


def test_training_batches_from_worker_processes_arrive_in_step_order():
    expected = [du.make_shapes(2, seed=(5, k)) for k in range(3, 8)]
    stream = du.training_batches(2, seed=5, start_step=3, workers=2)
    got = [next(stream) for _ in range(5)]
    del stream  # shuts the workers down
    assert all(torch.equal(images, drawn.images) for (images, _), drawn in zip(got, expected))
    assert all(condition.labels.tolist() == drawn.labels.tolist() for (_, condition), drawn in zip(got, expected))


def test_fixed_batches_draw_from_the_set_reproducibly():
    images = du.make_shapes(10, seed=0).images
    stream = du.fixed_batches(images, 6, seed=2)
    batches = [next(stream) for _ in range(3)]
    for b, condition in batches:
        assert b.shape == (6, 1, 64, 64) and condition is None  # plain images: nothing known about them
        for image in b:  # every image is one of the set
            assert any(torch.equal(image, candidate) for candidate in images)
    index = np.random.default_rng((2, 1)).integers(0, 10, 6)
    assert torch.equal(batches[1][0], images[torch.from_numpy(index)])
    resumed = du.fixed_batches(images, 6, seed=2, start_step=2)
    assert torch.equal(next(resumed)[0], batches[2][0])
    assert not torch.equal(next(du.fixed_batches(images, 6, seed=3))[0], batches[0][0])


def test_fixed_batches_of_a_shape_batch_carry_its_conditions():
    data = du.make_shapes(10, seed=0)
    images, condition = next(du.fixed_batches(data, 6, seed=2))
    index = torch.from_numpy(np.random.default_rng((2, 0)).integers(0, 10, 6))
    assert torch.equal(images, data.images[index])
    assert condition.labels.tolist() == data.labels[index.numpy()].tolist()
    assert condition.sizes.tolist() == data.sizes[index.numpy()].tolist()


def test_fixed_batches_refuse_images_outside_the_range():
    images = du.make_shapes(2, seed=0).images * 3
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        next(du.fixed_batches(images, 2))
