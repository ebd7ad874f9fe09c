"""Section 7: the shape metrics, checked on images whose answer is known."""

import math

import cv2
import numpy as np
import pytest
import torch

import diffusion_utils as du


def blank() -> np.ndarray:
    return np.zeros((64, 64), np.uint8)


def as_batch(*images: np.ndarray) -> np.ndarray:
    return np.stack(images)


@pytest.fixture(scope="module")
def real():
    return du.make_shapes(256, seed=21)


@pytest.fixture(scope="module")
def real_scores(real):
    return du.evaluate_samples(real.images)


def test_real_data_is_all_valid_and_half_circles(real_scores):
    assert set(real_scores) == {"n", "valid", "circle_share", "mid_gray", "size_w1", "position_w1"}
    assert real_scores["n"] == 256
    assert real_scores["valid"] == 1.0
    assert real_scores["mid_gray"] == 0.0
    assert 0.4 < real_scores["circle_share"] < 0.6
    # 256 real images against the 2048-image reference: the same distributions, up to sampling noise
    assert real_scores["size_w1"] < 1.5 and real_scores["position_w1"] < 1.5


def test_every_real_shape_is_read_back_correctly(real):
    for image, label, center, size in zip(du.model_to_uint8(real.images), real.labels, real.centers, real.sizes):
        reading = du.read_shape(image)
        assert reading.valid and reading.blobs == 1 and reading.label == label
        assert reading.center == pytest.approx(tuple(center), abs=1e-9)  # centroid of the pixels
        if label == du.SQUARE:
            assert reading.size == size  # side of the equal-area square: sqrt(side^2)
        else:
            assert reading.size == pytest.approx(size - 1, abs=0.6)  # 2 sqrt(area / pi), area ~ pi r^2


def test_a_sample_compared_with_itself_has_zero_distances(real):
    readings = [du.read_shape(image) for image in du.model_to_uint8(real.images)]
    scores = du.evaluate_samples(real.images, reference=readings)
    assert scores["size_w1"] == 0.0 and scores["position_w1"] == 0.0


def test_uint8_arrays_score_like_the_float_images(real, real_scores):
    as_uint8 = du.model_to_uint8(real.images)
    assert as_uint8.shape == (256, 64, 64) and as_uint8.dtype == np.uint8
    assert du.evaluate_samples(as_uint8) == real_scores


def test_shifting_every_shape_by_3_px_gives_a_position_distance_of_1_5():
    images = du.model_to_uint8(du.make_shapes(64, seed=4).images)
    reference = [du.read_shape(image) for image in images]
    shifted = np.roll(images, 3, axis=2)  # 3 px right (margins keep every shape inside)
    scores = du.evaluate_samples(shifted, reference=reference)
    # every x quantile moves by 3 and y not at all: (3 + 0) / 2; sizes are unchanged
    assert scores["valid"] == 1.0
    assert scores["position_w1"] == pytest.approx(1.5, abs=1e-9)
    assert scores["size_w1"] == 0.0


def test_larger_shapes_give_a_size_distance():
    squares = np.stack([du.draw_shape(du.SQUARE, (32, 32), side) for side in (16, 20, 24)])
    bigger = np.stack([du.draw_shape(du.SQUARE, (32, 32), side + 4) for side in (16, 20, 24)])
    reference = [du.read_shape(image) for image in squares]
    assert du.evaluate_samples(bigger, reference=reference)["size_w1"] == pytest.approx(4.0)


def test_pure_noise_is_never_valid():
    noise = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    scores = du.evaluate_samples(noise)
    assert scores["valid"] == 0.0
    assert math.isnan(scores["circle_share"]) and math.isnan(scores["size_w1"]) and math.isnan(scores["position_w1"])
    assert scores["mid_gray"] > 0.3


def test_a_blank_image_is_invalid():
    reading = du.read_shape(blank())
    assert (reading.blobs, reading.label, reading.iou) == (0, -1, 0.0) and not reading.valid
    assert du.evaluate_samples(as_batch(blank()))["valid"] == 0.0
    assert du.ideal_shape_iou(np.zeros((64, 64), bool)) == (-1, 0.0)


def test_two_shapes_in_one_frame_are_invalid():
    image = du.draw_shape(du.CIRCLE, (16, 16), 15) | du.draw_shape(du.SQUARE, (46, 46), 15)
    reading = du.read_shape(image)
    assert reading.blobs == 2 and not reading.valid
    assert du.evaluate_samples(as_batch(image))["valid"] == 0.0


def test_specks_under_five_pixels_are_ignored():
    image = du.draw_shape(du.SQUARE, (30, 30), 20)
    image[2:4, 2:4] = 255  # 4 pixels: ignored
    assert du.read_shape(image).blobs == 1 and du.read_shape(image).valid
    image[2, 4] = 255  # 5 pixels: a second blob
    assert du.read_shape(image).blobs == 2 and not du.read_shape(image).valid


def test_a_rectangle_is_invalid():
    image = blank()
    cv2.rectangle(image, (20, 15), (29, 44), 255, thickness=-1)  # 10 x 30
    reading = du.read_shape(image)
    # Ideal shapes of equal area (300) at the same centre, by hand:
    #   square of side 17.3: overlap 10 x 17.3 = 173, IoU = 173 / (600 - 173) = 0.41
    #   circle of radius 9.77: overlap = its part within |x| <= 5, 187 px, IoU = 187 / (600 - 187) = 0.45
    assert reading.blobs == 1 and reading.label == du.CIRCLE
    assert reading.iou == pytest.approx(0.45, abs=0.02)
    assert not reading.valid


def test_an_ellipse_is_invalid():
    image = blank()
    cv2.ellipse(image, (32, 32), (8, 20), 0, 0, 360, 255, thickness=-1)
    reading = du.read_shape(image)
    assert reading.blobs == 1 and reading.iou < du.VALID_IOU and not reading.valid


def test_a_ring_is_invalid():
    image = du.draw_shape(du.CIRCLE, (32, 32), 31)
    image[du.draw_shape(du.CIRCLE, (32, 32), 21) > 0] = 0
    assert not du.read_shape(image).valid


@pytest.mark.parametrize(("label", "size"), [(du.CIRCLE, 15), (du.CIRCLE, 39), (du.SQUARE, 15), (du.SQUARE, 39)])
def test_ideal_shapes_are_valid_and_recognised(label, size):
    reading = du.read_shape(du.draw_shape(label, (32, 32), size))
    assert reading.valid and reading.label == label and reading.iou > 0.95


def test_gray_images_count_as_mid_gray_and_thresholds_are_exclusive():
    half = blank()
    half[:, :32] = 128
    assert du.evaluate_samples(as_batch(half))["mid_gray"] == 0.5
    edges = blank()
    edges[:32] = 32
    edges[32:] = 223  # the thresholds themselves are not blur
    assert du.evaluate_samples(as_batch(edges))["mid_gray"] == 0.0
    assert du.evaluate_samples(as_batch(edges, half))["mid_gray"] == 0.25


def test_wasserstein_by_hand():
    a = np.array([0.0, 1.0, 2.0])
    assert du.wasserstein_1d(a, a + 3) == pytest.approx(3.0)
    assert du.wasserstein_1d(a, a[::-1]) == 0.0
    assert du.wasserstein_1d(np.zeros(5), np.ones(7)) == pytest.approx(1.0)
    assert math.isnan(du.wasserstein_1d(np.array([]), a))


@pytest.mark.parametrize(
    ("samples", "error", "message"),
    [
        (np.zeros((2, 64, 64), np.float32), TypeError, "dtype float32"),
        (np.zeros((2, 64, 64), np.int64), TypeError, "dtype int64"),
        (np.zeros((2, 1, 64, 64), np.uint8), ValueError, r"shape \(N, 64, 64\).*got \(2, 1, 64, 64\)"),
        (np.zeros((2, 32, 32), np.uint8), ValueError, r"got \(2, 32, 32\)"),
        (np.zeros((0, 64, 64), np.uint8), ValueError, r"N >= 1, got \(0, 64, 64\)"),
        ([[0] * 64] * 64, TypeError, "got list"),
        (torch.zeros(2, 1, 64, 64, dtype=torch.uint8), TypeError, "torch.uint8"),
        (torch.zeros(2, 64, 64), ValueError, r"got \(2, 64, 64\)"),
    ],
)
def test_bad_samples_are_refused_naming_the_problem(samples, error, message):
    with pytest.raises(error, match=message):
        du.evaluate_samples(samples)
