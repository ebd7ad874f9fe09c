"""Section 11: requests (class, centre, size), condition dropout and classifier-free guidance."""

import copy
import hashlib
import math

import cv2
import numpy as np
import pytest
import torch
from helpers import perturbed, same_state, tiny_model_config, tiny_train_config
from torch import nn

import diffusion_utils as du


@pytest.fixture(scope="module")
def conditional_net():
    torch.manual_seed(0)
    return perturbed(du.UNet(tiny_model_config(conditional=True)))


def inputs(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 64, 64, generator=generator), torch.randint(0, 1000, (n,), generator=generator)


# ------------------------------------------------------------------------------------------
# Conditions and their dropout
# ------------------------------------------------------------------------------------------


def test_a_shape_batch_knows_the_request_each_image_answers():
    batch = du.make_shapes(5, seed=3)
    condition = batch.condition()
    assert condition.labels.tolist() == batch.labels.tolist()
    assert condition.centers.tolist() == batch.centers.tolist() and condition.sizes.tolist() == batch.sizes.tolist()


def test_the_null_condition_gives_nothing():
    null = du.Condition.null(3)
    assert len(null) == 3 and not any(bool(mask.any()) for mask in null.given().values())
    assert du.describe_request(null) == "anything"


def test_dropout_hides_each_field_with_its_probability_independently():
    n, p = 20_000, 0.3
    full = du.make_shapes(n, seed=0).condition()
    given = full.dropped(p, torch.Generator().manual_seed(0)).given()
    sigma = math.sqrt(p * (1 - p) / n)
    for name, mask in given.items():
        assert abs(1 - float(mask.float().mean()) - p) < 4 * sigma, name
    all_hidden = float((~given["class"] & ~given["center"] & ~given["size"]).float().mean())
    assert abs(all_hidden - p**3) < 4 * math.sqrt(p**3 * (1 - p**3) / n)  # independent fields
    kept = given["class"]
    assert torch.equal(full.dropped(0.0).labels, full.labels)
    assert not bool(full.dropped(1.0).given()["size"].any())
    assert torch.equal(full.dropped(p, torch.Generator().manual_seed(0)).labels[kept], full.labels[kept])


# ------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------


def test_an_untrained_conditional_unet_is_the_unconditional_one():
    """The request embedding starts at zero: with the same weights elsewhere, the outputs are identical."""
    unconditional = perturbed(du.UNet(tiny_model_config()))
    conditional = du.UNet(tiny_model_config(conditional=True)).eval()
    missing, unexpected = conditional.load_state_dict(unconditional.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("condition_embedding.") for key in missing)
    x, t = inputs()
    request = du.make_shapes(4, seed=1).condition()
    with torch.no_grad():
        assert torch.equal(conditional(x, t, request), unconditional(x, t))


def test_no_condition_is_the_null_condition_and_a_request_changes_the_output(conditional_net):
    x, t = inputs()
    with torch.no_grad():
        none = conditional_net(x, t)
        assert torch.equal(none, conditional_net(x, t, du.Condition.null(4)))
        asked = conditional_net(x, t, du.request(4, "square", 25, (32, 32)))
    assert (asked - none).abs().max() > 1e-3


def test_an_unconditional_unet_refuses_a_request_but_takes_the_null_one():
    model = du.UNet(tiny_model_config()).eval()
    x, t = inputs(2)
    with pytest.raises(ValueError, match="this U-Net is unconditional"):
        model(x, t, du.request(2, "circle"))
    with torch.no_grad():
        assert torch.equal(model(x, t, du.Condition.null(2)), model(x, t))


# ------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------


def test_guidance_1_is_the_conditional_output_and_0_the_unconditional(conditional_net):
    x, t = inputs()
    request = du.request(4, "circle", 21)
    with torch.no_grad():
        cond, uncond = conditional_net(x, t, request), conditional_net(x, t)
        assert torch.equal(du.guided_output(conditional_net, x, t, request, 1.0), cond)
        assert torch.equal(du.guided_output(conditional_net, x, t, request, 0.0), uncond)
        assert torch.equal(du.guided_output(conditional_net, x, t, None, 3.0), uncond)


@pytest.mark.parametrize("scale", [0.5, 1.5, 3.0])
def test_guidance_extrapolates_from_the_unconditional_to_the_conditional_output(conditional_net, scale):
    """out = u + s (c - u), with both passes in one batched forward (equal to two separate ones)."""
    x, t = inputs()
    request = du.request(4, "square", None, (30, 34))
    with torch.no_grad():
        cond, uncond = conditional_net(x, t, request), conditional_net(x, t)
        guided = du.guided_output(conditional_net, x, t, request, scale)
    torch.testing.assert_close(guided, uncond + scale * (cond - uncond), rtol=0, atol=1e-5)


def test_guiding_v_is_guiding_eps_and_x0():
    """eps and x0_hat are affine in v with the same coefficients at a given x_t, so they follow the same rule."""
    schedule = du.NoiseSchedule.create("cosine", 1000)
    generator = torch.Generator().manual_seed(2)
    x_t, cond, uncond = (torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([10, 400, 990])
    s = 2.5
    guided_x0 = schedule.predict_x0("v", x_t, uncond + s * (cond - uncond), t)
    x0_u, x0_c = schedule.predict_x0("v", x_t, uncond, t), schedule.predict_x0("v", x_t, cond, t)
    torch.testing.assert_close(guided_x0, x0_u + s * (x0_c - x0_u), rtol=0, atol=1e-9)


def test_sampling_with_a_request_is_seeded_and_independent_of_the_batch_size(conditional_net):
    schedule = du.NoiseSchedule.create("cosine", 1000)
    request = du.request(5, "circle", 19, (30, 30))
    args = dict(steps=3, sampler="dpm++", condition=request, guidance=2.0, seed=4, progress=False)
    whole = du.sample(conditional_net, schedule, 5, batch_size=5, **args)
    chunked = du.sample(conditional_net, schedule, 5, batch_size=2, **args)
    assert torch.allclose(whole.images, chunked.images, atol=1e-5)
    unguided = du.sample(conditional_net, schedule, 5, steps=3, sampler="dpm++", seed=4, progress=False)
    assert not torch.allclose(whole.images, unguided.images, atol=1e-3)


def test_sample_refuses_bad_guidance_and_requests():
    schedule = du.NoiseSchedule.create("cosine", 1000)
    unconditional = du.UNet(tiny_model_config()).eval()
    conditional = du.UNet(tiny_model_config(conditional=True)).eval()
    with pytest.raises(ValueError, match="guidance must be a number >= 0, got -1"):
        du.sample(conditional, schedule, 1, steps=2, condition=du.request(1, "circle"), guidance=-1, progress=False)
    with pytest.raises(ValueError, match="this model is unconditional"):
        du.sample(unconditional, schedule, 1, steps=2, condition=du.request(1, "circle"), progress=False)
    with pytest.raises(ValueError, match="the condition holds 2 requests for 3 images"):
        du.sample(conditional, schedule, 3, steps=2, condition=du.request(2, "circle"), progress=False)


# ------------------------------------------------------------------------------------------
# Requests: what the data can show
# ------------------------------------------------------------------------------------------


def test_a_request_repeats_one_ask_with_unset_fields_null():
    condition = du.request(3, "square", 20, None)
    assert condition.labels.tolist() == [du.SQUARE] * 3 and condition.sizes.tolist() == [20.0] * 3
    assert not bool(condition.given()["center"].any())
    assert du.describe_request(du.request(1, "circle", 25, (30, 40))) == "circle, 25 px, at (30, 40)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "triangle"}, "unknown shape 'triangle'; choose one of circle, square"),
        ({"size": 14}, "size must be within the data's 15-39 px, got 14"),
        ({"size": 40}, "size must be within the data's 15-39 px, got 40"),
        ({"size": 39, "center": (22, 32)}, "a centre x of 22 puts a 39 px shape outside the frame's 4 px margin"),
        ({"center": (32, 58)}, "a centre y of 58 puts a 15 px shape outside the frame's 4 px margin"),
        ({"center": (math.nan, 32)}, "a centre x of nan"),
    ],
)
def test_impossible_requests_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        du.request(2, **kwargs)


def test_every_centre_the_data_draws_is_a_possible_request():
    batch = du.make_shapes(500, seed=5)
    for center, size in zip(batch.centers, batch.sizes):
        du.request(1, None, float(size), tuple(center))  # raises if the data's own shapes were refused


# ------------------------------------------------------------------------------------------
# Evaluation of requests
# ------------------------------------------------------------------------------------------


def test_real_data_obeys_its_own_requests_exactly():
    batch = du.make_shapes(200, seed=8)
    scores = du.evaluate_requests(batch.images, batch.condition())
    assert scores == {
        "n": 200,
        "valid": 1.0,
        "class_accuracy": 1.0,
        "matches": 1.0,
        "center_error": 0.0,
        "size_error": 0.0,
    }


def test_the_wrong_class_and_a_shifted_shape_are_measured():
    batch = du.make_shapes(50, seed=9)
    condition = batch.condition()
    swapped = condition.replace(labels=1 - condition.labels)
    assert du.evaluate_requests(batch.images, swapped)["class_accuracy"] == 0.0
    shifted = condition.replace(centers=condition.centers + torch.tensor([3.0, 4.0]))
    scores = du.evaluate_requests(batch.images, shifted)
    assert scores["center_error"] == pytest.approx(5.0, abs=1e-9) and scores["size_error"] == 0.0
    larger = condition.replace(sizes=condition.sizes + 2)
    assert du.evaluate_requests(batch.images, larger)["size_error"] == pytest.approx(2.0, abs=0.35)


def test_nothing_asked_or_nothing_valid_gives_nan():
    blank = torch.full((4, 1, 64, 64), -1.0)
    scores = du.evaluate_requests(blank, du.request(4, "circle", 20, (32, 32)))
    assert scores["valid"] == 0.0 and scores["matches"] == 0.0
    assert all(math.isnan(scores[key]) for key in ("class_accuracy", "center_error", "size_error"))
    batch = du.make_shapes(4, seed=1)
    assert math.isnan(du.evaluate_requests(batch.images, du.Condition.null(4))["class_accuracy"])


def test_request_matches_outlines_each_sample():
    batch = du.make_shapes(6, seed=2)
    condition = batch.condition()
    assert du.request_matches(batch.images, condition) == [True] * 6
    wrong = condition.replace(labels=1 - condition.labels)
    assert du.request_matches(batch.images, wrong) == [False] * 6


# ------------------------------------------------------------------------------------------
# Training and checkpoints
# ------------------------------------------------------------------------------------------


def test_a_conditional_training_step_is_diffusion_loss_with_the_dropped_condition():
    trainer = du.Trainer(tiny_model_config(conditional=True), tiny_train_config(condition_dropout=0.5), device="cpu")
    x0, condition = next(trainer.batches())
    generator = torch.Generator().set_state(trainer.generator.get_state())
    dropped = condition.dropped(0.5, generator)  # drawn first, from the trainer's generator
    with torch.no_grad():
        expected = du.diffusion_loss(trainer.model, trainer.schedule, x0, "v", trainer.loss_weights, generator, dropped)
    assert float(trainer.train_step(x0, condition)) == pytest.approx(float(expected), rel=1e-5)


def test_a_conditional_model_needs_to_know_what_its_images_show():
    with pytest.raises(ValueError, match="pass data as a ShapeBatch"):
        du.Trainer(
            tiny_model_config(conditional=True), tiny_train_config(), device="cpu", data=du.make_shapes(4).images
        )
    trainer = du.Trainer(tiny_model_config(conditional=True), tiny_train_config(), device="cpu", data=du.make_shapes(8))
    trainer.train(steps=2, progress=False)
    with pytest.raises(ValueError, match="needs the condition of every training image"):
        trainer.train_step(du.make_shapes(4).images)


def test_a_conditional_checkpoint_round_trips_and_samples(tmp_path):
    trainer = du.Trainer(tiny_model_config(conditional=True), tiny_train_config(), device="cpu")
    trainer.train(steps=2, progress=False)
    path = du.save_checkpoint(tmp_path / "conditional.pt", trainer)
    loaded = du.load_trainer(path)
    assert loaded.model_config.conditional and loaded.train_config == trainer.train_config
    assert same_state(loaded.model.state_dict(), trainer.model.state_dict())
    model, schedule = du.load_model(path)
    request = du.request(2, "circle", 25)
    result = du.sample(model, schedule, 2, steps=2, condition=request, guidance=2.0, progress=False)
    again = du.sample(
        trainer.sampling_model, trainer.schedule, 2, steps=2, condition=request, guidance=2.0, progress=False
    )
    assert torch.equal(result.images, again.images)


def test_a_checkpoint_from_before_conditioning_is_refused_naming_its_format(trained, tmp_path):
    """Files written before the conditioning, the lr schedule and num_timesteps existed (format /1, early) cannot be
    loaded as they were trained without guessing: refused in one line that names the format and what is missing."""
    trainer, path = trained
    payload = torch.load(path, weights_only=True)
    payload["format"] = "diffusion_patterns/1"
    model_config, train_config = payload["model_config"], payload["train_config"]
    model_config["timesteps"] = model_config.pop("num_timesteps")
    del model_config["conditional"]
    for key in ("lr_schedule", "condition_dropout", "min_snr_form"):
        del train_config[key]
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    for load in (du.load_trainer, du.load_model):
        with pytest.raises(du.CheckpointError) as error:
            load(older)
        message = str(error.value)
        assert (
            message.startswith(f"{older}: an early 'diffusion_patterns/1' checkpoint without ") and "\n" not in message
        )
        assert all(name in message for name in ("conditional", "num_timesteps", "lr_schedule", "min_snr_form"))


# ------------------------------------------------------------------------------------------
# What training and checkpoints depend on: the data, the dropout draws and the embedding's layout
# ------------------------------------------------------------------------------------------


def test_make_shapes_draws_the_stream_every_measured_run_trained_on():
    """A fingerprint of images, classes, centres and sizes: a change to drawing or to the order of random draws
    would change every training run and every measured result."""
    batch = du.make_shapes(256, seed=(0, 7))
    digest = hashlib.sha256()
    for array in (du.model_to_uint8(batch.images), batch.labels.astype(np.int64), batch.centers, batch.sizes):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == "24aca7efc0f7150e23ed755ed558d8d0c9fe8df7cb6961a9d68c5872ffdb73af"


def test_dropout_draws_a_row_per_field_and_a_spare_one():
    """Condition.dropped's random draws are part of the training stream: (fields + 1) x n uniforms, row k hides
    field k; the last row is drawn and unused."""
    n, p = 64, 0.5
    full = du.make_shapes(n, seed=0).condition()
    generator = torch.Generator().manual_seed(4)
    given = full.dropped(p, generator).given()
    replay = torch.Generator().manual_seed(4)
    hidden = torch.rand((4, n), generator=replay) < p
    assert [given[name].tolist() for name in ("class", "center", "size")] == (~hidden[:3]).tolist()
    assert torch.equal(torch.rand(8, generator=generator), torch.rand(8, generator=replay))


class FrozenConditionEmbedding(nn.Module):
    """The condition embedding that checkpoints of format diffusion_patterns/1 hold, written out by hand: the one
    built from REQUEST_FIELDS must keep its parameter names, shapes, order, initial values and outputs."""

    def __init__(self, features: int, dim: int) -> None:
        super().__init__()
        self.features = features
        self.classes = nn.Embedding(3, dim)
        self.center = nn.Sequential(nn.Linear(2 * features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.size = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null_center = nn.Parameter(torch.zeros(dim))
        self.null_size = nn.Parameter(torch.zeros(dim))
        for layer in (self.classes, self.center[-1], self.size[-1]):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.center[-1].bias)
        nn.init.zeros_(self.size[-1].bias)

    def forward(self, condition: du.Condition) -> torch.Tensor:
        labels = torch.where(condition.labels >= 0, condition.labels, 2)
        centers, sizes = condition.centers.nan_to_num(0.0), condition.sizes.nan_to_num(0.0)
        center_given, size_given = ~condition.centers.isnan().any(1), ~condition.sizes.isnan()

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return du.sinusoidal_embedding(pixels, self.features, max_period=64.0)

        center_features = torch.cat([features(centers[:, 0]), features(centers[:, 1])], 1)
        center = torch.where(center_given[:, None], self.center(center_features), self.null_center)
        size = torch.where(size_given[:, None], self.size(features(sizes)), self.null_size)
        return self.classes(labels) + center + size


def test_the_condition_embedding_keeps_the_layout_and_outputs_of_checkpoints():
    torch.manual_seed(0)
    built = du.ConditionEmbedding(8, 32)
    torch.manual_seed(0)
    frozen = FrozenConditionEmbedding(8, 32)
    names = [name for name, _ in built.named_parameters()]
    assert names == [name for name, _ in frozen.named_parameters()]  # the optimiser's state follows this order
    assert same_state(built.state_dict(), frozen.state_dict())  # the same initial values, from the same draws

    net = perturbed(du.UNet(tiny_model_config(conditional=True)))
    old = copy.deepcopy(net)
    old.condition_embedding = FrozenConditionEmbedding(8, 32)
    old.load_state_dict(net.state_dict())  # strict: the same keys and shapes
    x, t = inputs(16)
    asked = du.make_shapes(16, seed=4).condition().dropped(0.5, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(net(x, t, asked), old(x, t, asked))  # bit for bit
        assert torch.equal(net(x, t), old(x, t))


# ------------------------------------------------------------------------------------------
# Declared once: a new class of shape is one entry of du.SHAPES
# ------------------------------------------------------------------------------------------


def draw_diamond(image: np.ndarray, x: int, y: int, size: int) -> None:
    r = (size - 1) // 2
    corners = np.array([[x - r, y], [x, y - r], [x + r, y], [x, y + r]], np.int32)
    cv2.fillPoly(image, [corners], 255, lineType=cv2.LINE_8)


DIAMOND = du.ShapeClass(
    "diamond",  # a square turned by 45 degrees: the pixels within L1 distance r of the anchor
    odd_sizes=True,
    draw=draw_diamond,
    ideal=lambda dx, dy, size: np.abs(dx) + np.abs(dy) <= size / 2,
    size_of_area=lambda area: math.sqrt(2 * area),  # area = 2 (size / 2)^2
)


def test_a_new_class_of_shape_is_drawn_learned_asked_read_and_scored_from_its_registry_entry(monkeypatch):
    monkeypatch.setattr(du, "SHAPES", (*du.SHAPES, DIAMOND))
    diamond = len(du.SHAPES) - 1

    image = du.draw_shape(diamond, (30, 34), 21)
    ys, xs = np.nonzero(image)
    assert len(xs) == 2 * 10**2 + 2 * 10 + 1 and int((abs(xs - 30) + abs(ys - 34)).max()) == 10

    batch = du.make_shapes(60, seed=0)  # the data draws every class, and the reader tells each from the others
    assert set(batch.labels.tolist()) == {du.CIRCLE, du.SQUARE, diamond}
    readings = [du.read_shape(im) for im in du.model_to_uint8(batch.images)]
    assert [r.label for r in readings] == batch.labels.tolist()
    assert all(r.valid and r.iou >= 0.9 for r in readings)
    perfect = {"n": 60, "valid": 1.0, "class_accuracy": 1.0, "matches": 1.0, "center_error": 0.0, "size_error": 0.0}
    assert du.evaluate_requests(batch.images, batch.condition()) == perfect

    asked = du.request(3, "diamond", 21, (30, 34))
    assert asked.labels.tolist() == [diamond] * 3 and du.describe_request(asked) == "diamond, 21 px, at (30, 34)"
    images = np.stack([image] * 3)
    assert du.evaluate_requests(images, asked) == {**perfect, "n": 3}
    wrong = du.evaluate_requests(images, du.request(3, "square", 21, (30, 34)))
    assert wrong["class_accuracy"] == 0.0 and wrong["matches"] == 0.0
    with pytest.raises(ValueError, match="choose one of circle, square, diamond"):
        du.request(1, "triangle")

    net = perturbed(du.UNet(tiny_model_config(conditional=True)))
    assert net.condition_embedding.classes.weight.shape[0] == 4  # three classes and "not given"
    x, t = inputs(3)
    with torch.no_grad():
        as_diamond, as_square = net(x, t, asked), net(x, t, du.request(3, "square", 21, (30, 34)))
    assert (as_diamond - as_square).abs().max() > 1e-3

    args = du.build_parser().parse_args(["evaluate", "samples.npy", "--shape", "diamond", "--size", "21"])
    assert du.describe_request(du._request_from(args, 1)) == "diamond, 21 px"
