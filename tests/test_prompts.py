"""Prompts: captions of the data, the tokenizer and parser, the text encoder and cross-attention, guidance on a
prompt, scoring word by word, and the command line's --prompt."""

import dataclasses
import json
import math

import matplotlib.colors
import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, perturbed, run_main, tiny_model_config, tiny_train_config

import diffusion_utils as du


def prompt_config(**overrides) -> du.ModelConfig:
    return tiny_model_config(conditional=True, conditioning="prompt", text_width=16, text_layers=1, **overrides)


@pytest.fixture(scope="module")
def prompt_net():
    torch.manual_seed(0)
    return perturbed(du.UNet(prompt_config()))


def inputs(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 64, 64, generator=generator), torch.randint(0, 1000, (n,), generator=generator)


def many_captions(n: int = 4000, seed: int = 11, dropout: float = 0.3, held_out: bool = False):
    batch = du.make_shapes(n, seed=seed)
    return batch, du.captions(batch, np.random.default_rng(seed), dropout, held_out)


# ------------------------------------------------------------------------------------------
# Captions, tokens and the parser
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("held_out", [False, True])
def test_every_caption_parses_back_to_the_shape_it_describes(held_out):
    batch, texts = many_captions(held_out=held_out)
    for label, size, center, text in zip(batch.labels, batch.sizes, batch.centers, texts):
        ask = du.read_prompt(text)
        center = (float(center[0]), float(center[1]))
        assert len(du.prompt_tokens(text)) <= du.PROMPT_LENGTH, text
        assert ask.label in (None, label), text
        assert ask.size_word in (None, du.size_word(size)) and ask.size in (None, size), text
        assert ask.half is None or du.HALVES[ask.half](*center), text
        assert ask.quadrant in (None, du.quadrant_of(center)), text
        assert not ask.centre or du.is_centre(center), text
        assert ask.center in (None, center), text
        if held_out:  # a held-out prompt gives every part
            assert ask.label is not None and len(ask.order) == 3, text


def test_captions_leave_parts_out_independently_and_use_every_word():
    n, p = 4000, 0.3
    _, texts = many_captions(n, dropout=p)
    asks = [du.read_prompt(text) for text in texts]
    for group in ("class", "size", "place"):
        given = np.mean([any(du.PROMPT_GROUPS[kind] == group for kind in ask.order) for ask in asks])
        assert abs(given - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), group
    assert abs(texts.count("") / n - p**3) < 4 * math.sqrt(p**3 / n)  # the empty prompt: all parts left out
    kinds = {kind for ask in asks for kind in ask.order}
    assert kinds == set(du.PROMPT_GROUPS)
    seen = {word for text in texts for word in du.prompt_token_names(text)}
    words = set(du.VOCABULARY[1 : du.FIRST_NUMBER_ID]) | {du.HALF_PIXEL}
    assert words - seen == set()  # no word of the vocabulary is left untrained


def test_the_size_words_and_places_follow_the_issues_bounds():
    assert [du.size_word(s) for s in (15, 22, 23, 31, 32, 39)] == ["small"] * 2 + ["medium"] * 2 + ["large"] * 2
    assert du.quadrant_of((10, 50)) == "bottom left" and du.quadrant_of((31.5, 50)) is None
    assert du.is_centre((31.5 + 6, 31.5)) and not du.is_centre((31.5 + 4.5, 31.5 + 4.5))


def test_held_out_phrasings_never_appear_in_training():
    _, training = many_captions(6000, seed=3, dropout=0.5)
    orders = {du.read_prompt(text).order for text in training}
    held_out = du.held_out_prompts(500, seed=4)
    assert {du.read_prompt(text).order for text in held_out}.isdisjoint(orders)
    assert set(held_out).isdisjoint(training)
    seen = du.seen_prompts(500, seed=4)  # the same shapes in training templates
    assert {du.read_prompt(text).order for text in seen} <= orders


def test_the_example_prompts_read_as_meant():
    assert du.read_prompt("a small circle in the top left corner") == du.PromptAsk(
        label=du.CIRCLE, size_word="small", quadrant="top left", order=("size word", "class", "quadrant")
    )
    assert du.read_prompt("large square, bottom right").quadrant == "bottom right"
    assert du.read_prompt("in the middle a medium circle").centre
    ask = du.read_prompt("Square 25 px wide at 30.5, 40")
    assert (ask.label, ask.size, ask.center) == (du.SQUARE, 25.0, (30.5, 40.0))
    assert du.prompt_token_names("at 30.5, 40")[:4] == ["at", "30", ".5", ","]
    assert du.read_prompt("") == du.PromptAsk()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a triangle on the left", ["unknown word 'triangle'", "circle", "square", "small", "centre"]),
        ("a circle 50 px wide", ["size must be within the data's 15-39 px, got 50"]),
        ("a circle at 2, 30", ["puts a 15 px shape outside the frame"]),
        ("a square 39 px at 55, 30", ["puts a 39 px shape outside the frame"]),
        ("a circle and a square", ["asks for two class"]),
        ("a small circle 25 px", ["asks for two size"]),
        ("a circle on the left in the middle", ["asks for two place"]),
        ("a circle 25", ["neither a size (25 px) nor a place"]),
        ("a circle at 30.25, 40", ["not a whole or half pixel"]),
        ("a " * 17 + "circle", ["tokens long, more than the encoder's 16"]),
    ],
)
def test_bad_prompts_are_named(text, fragments):
    with pytest.raises(ValueError) as error:
        du.prompt_tokens(text)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ------------------------------------------------------------------------------------------
# The batch the model reads, and the training stream
# ------------------------------------------------------------------------------------------


def test_a_prompt_batch_has_the_interface_of_a_condition():
    prompt = du.Prompt.of(["a circle", "", "square at 30, 40"])
    assert len(prompt) == 3 and prompt.lengths.tolist() == [2, 0, 5]
    assert prompt.given()["prompt"].tolist() == [True, False, True]
    assert prompt.select(torch.tensor([2, 0])).texts == ("square at 30, 40", "a circle")
    both = prompt.cat(du.Prompt.null(2))
    assert len(both) == 5 and both.lengths.tolist()[3:] == [0, 0]
    assert prompt.dropped(0.5, torch.Generator()) is prompt
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    prompt.dropped(0.5, generator)
    assert torch.equal(generator.get_state(), state)  # draws nothing


def test_the_request_stream_is_untouched_and_the_prompt_stream_captions_the_same_images():
    requests = iter(du.ShapeStream(8, seed=2, start_step=5))
    prompts = iter(du.ShapeStream(8, seed=2, start_step=5, conditioning="prompt", dropout=0.5))
    for step in (5, 6):
        images, condition = next(requests)
        batch = du.make_shapes(8, seed=(2, step))
        assert torch.equal(images, batch.images) and torch.equal(condition.labels, batch.condition().labels)
        same_images, prompt = next(prompts)
        assert torch.equal(same_images, images) and isinstance(prompt, du.Prompt)
        assert list(prompt.texts) == du.captions(batch, np.random.default_rng((2, step, 1)), 0.5)


def test_a_prompt_model_trains_from_the_stream_and_from_fixed_data():
    for data in (None, du.make_shapes(16, seed=1)):
        trainer = du.Trainer(prompt_config(), tiny_train_config(), device="cpu", data=data)
        trainer.train(steps=2, progress=False)
        assert len(trainer.losses) == 2 and all(math.isfinite(v) for v in trainer.losses)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.text_encoder.parameters())


# ------------------------------------------------------------------------------------------
# The network: cross-attention, the text encoder, the switch
# ------------------------------------------------------------------------------------------


def test_cross_attention_is_softmax_qkt_over_sqrt_d_times_v():
    torch.manual_seed(3)
    block = du.CrossAttention(channels=8, text_width=6, heads=2)
    torch.nn.init.normal_(block.out.weight)
    x, text = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6)
    present = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q = block.query(block.norm(x)).reshape(2, 8, 9)  # (N, C, HW)
    kv = block.key_value(text)  # (N, T, 2C)
    k, v = kv[..., :8], kv[..., 8:]
    expected = torch.empty(2, 8, 9)
    for n in range(2):
        keep = present[n]
        for head in range(2):
            channels = slice(4 * head, 4 * head + 4)
            scores = q[n, channels].T @ k[n][keep][:, channels].T / math.sqrt(4)  # (HW, T)
            weights = torch.exp(scores - scores.max(1, keepdim=True).values)
            weights = weights / weights.sum(1, keepdim=True)
            expected[n, channels] = (weights @ v[n][keep][:, channels]).T
    expected = x + block.out(expected.reshape(2, 8, 3, 3))
    with torch.no_grad():
        assert torch.allclose(block(x, text, present), expected, atol=1e-5)
        weights = block.weights(x, text, present)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 9)) and bool((weights[1, :, :, 2:] == 0).all())


def test_a_prompt_changes_the_output_and_the_empty_prompt_is_the_unconditional_path(prompt_net):
    x, t = inputs()
    with torch.no_grad():
        none = prompt_net(x, t)
        assert torch.equal(none, prompt_net(x, t, du.Prompt.null(4)))
        left = prompt_net(x, t, du.Prompt.of(["a small circle on the left"] * 4))
        right = prompt_net(x, t, du.Prompt.of(["a small circle on the right"] * 4))
    assert (left - none).abs().max() > 1e-3 and (left - right).abs().max() > 1e-4


def test_each_model_reads_its_own_kind_of_ask(prompt_net):
    x, t = inputs(2)
    with pytest.raises(ValueError, match="reads a prompt .* not a request"):
        prompt_net(x, t, du.request(2, "circle"))
    with pytest.raises(ValueError, match="reads a request .* not a prompt"):
        du.UNet(tiny_model_config(conditional=True))(x, t, du.Prompt.of(["a circle"] * 2))
    with pytest.raises(ValueError, match="unconditional .* cannot take a prompt"):
        du.UNet(tiny_model_config())(x, t, du.Prompt.of(["a circle"] * 2))


def test_the_request_model_is_the_default_and_builds_no_text_modules():
    assert du.ModelConfig().conditioning == "request"
    keys = du.UNet(tiny_model_config(conditional=True)).state_dict().keys()
    assert not any(key.split(".")[0] in ("text_encoder", "prompt_pool", "mid_cross", "up_cross") for key in keys)
    with pytest.raises(ValueError, match="unknown conditioning 'words'"):
        du.ModelConfig(conditioning="words")


def test_guidance_on_a_prompt(prompt_net):
    x, t = inputs()
    prompt = du.Prompt.of(["square 25 px wide at 30, 40"] * 4)
    with torch.no_grad():
        cond, uncond = prompt_net(x, t, prompt), prompt_net(x, t)
        assert torch.equal(du.guided_output(prompt_net, x, t, prompt, 1.0), cond)
        assert torch.equal(du.guided_output(prompt_net, x, t, prompt, 0.0), uncond)
        guided = du.guided_output(prompt_net, x, t, prompt, 3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_a_prompt_samples_at_the_prompt_guidance_unless_told_and_a_request_at_its_own():
    assert du.DEFAULT_PROMPT_GUIDANCE != du.DEFAULT_GUIDANCE  # else the samples below could not tell them apart
    assert du.default_guidance(du.Prompt.of(["a circle"])) == du.DEFAULT_PROMPT_GUIDANCE
    assert du.default_guidance(du.request(1, "circle")) == du.default_guidance(None) == du.DEFAULT_GUIDANCE


def test_sampling_at_the_default_guidance_is_sampling_at_the_prompt_guidance(prompt_net):
    schedule = du.NoiseSchedule.from_config(prompt_net.config)
    options = {"steps": 3, "progress": False, "prompt": "a small circle on the left"}
    by_default = du.sample(prompt_net, schedule, 2, **options).images
    assert torch.equal(
        by_default, du.sample(prompt_net, schedule, 2, guidance=du.DEFAULT_PROMPT_GUIDANCE, **options).images
    )
    assert not torch.equal(by_default, du.sample(prompt_net, schedule, 2, guidance=1.0, **options).images)


def test_sampling_with_a_prompt_and_a_request_rendered_as_one(prompt_net):
    schedule = du.NoiseSchedule.from_config(prompt_net.config)
    asked = du.request(3, "circle", 25, (30.5, 40))
    assert du.prompt_of_request(asked) == ["circle 25 px wide at 30.5, 40"] * 3
    ask = du.read_prompt(du.prompt_of_request(asked)[0])
    assert (ask.label, ask.size, ask.center) == (du.CIRCLE, 25.0, (30.5, 40.0))
    kwargs = {"steps": 3, "progress": False, "guidance": 2.0}
    by_request = du.sample(prompt_net, schedule, 3, condition=asked, **kwargs).images
    by_prompt = du.sample(prompt_net, schedule, 3, prompt="circle 25 px wide at 30.5, 40", **kwargs).images
    assert torch.equal(by_request, by_prompt)
    with pytest.raises(ValueError, match="not both"):
        du.sample(prompt_net, schedule, 3, condition=asked, prompt="a circle", **kwargs)
    with pytest.raises(ValueError, match="unknown word 'blue'"):
        du.sample(prompt_net, schedule, 3, prompt="a blue circle", **kwargs)
    request_net = du.UNet(tiny_model_config(conditional=True))
    with pytest.raises(ValueError, match="reads requests"):
        du.sample(request_net, schedule, 3, prompt="a circle", **kwargs)


def test_attention_maps_give_each_pixel_a_share_of_every_word(prompt_net):
    x, t = inputs(2)
    text = "a small circle on the left"
    maps = du.cross_attention_maps(prompt_net, x, t, du.Prompt.of([text, ""]))
    words = len(du.prompt_token_names(text))
    assert maps.shape == (2, 1 + du.PROMPT_LENGTH, 64, 64)
    assert torch.allclose(maps.sum(1), torch.ones(2, 64, 64), atol=1e-5)
    assert bool((maps[0, 1 + words :] == 0).all()) and torch.allclose(maps[1, 0], torch.ones(64, 64))


def test_word_attention_reads_the_sample_noised_to_each_time(prompt_net, monkeypatch):
    """At one time the map is cross_attention_maps of x_0 noised there by the closed form q(x_t | x_0)."""
    schedule = du.NoiseSchedule.create("cosine", 1000)
    image, text, seed = du.make_shapes(1, seed=3).images[0], "a large square at the top", 5
    monkeypatch.setattr(du, "ATTENTION_TIMES", (0.5,))
    index = round(0.5 * 999)
    noise = torch.randn((1, 1, 64, 64), generator=torch.Generator().manual_seed(seed))
    abar = float(schedule.alpha_bars[index])
    x_t = (math.sqrt(abar) * image[None] + math.sqrt(1 - abar) * noise) * float(schedule.input_scales[index])
    expected = du.cross_attention_maps(prompt_net, x_t, torch.tensor([index]), du.Prompt.of([text]))[0]
    got = du.word_attention(prompt_net, schedule, image, text, seed)
    assert torch.allclose(got, expected, atol=1e-5)
    monkeypatch.setattr(du, "ATTENTION_TIMES", (0.2, 0.8))
    assert not torch.allclose(du.word_attention(prompt_net, schedule, image, text, seed), expected, atol=1e-3)


def test_the_prompt_grid_outlines_green_exactly_the_samples_that_obey():
    batch = du.make_shapes(2, seed=1)
    assert batch.labels[0] != batch.labels[1]  # a circle and a square: neither's description fits the other
    prompts = du.prompt_of_request(batch.condition())  # each image's own description
    images = batch.images[[0, 1, 0, 1]]  # row k: both images under prompt k; only image k obeys it
    fig = du.plot_prompt_grid(images, prompts, held_out=[False, True])
    green, red = matplotlib.colors.to_rgba("tab:green"), matplotlib.colors.to_rgba("red")
    assert [ax.spines["top"].get_edgecolor() for ax in fig.axes] == [green, red, red, green]
    assert fig.axes[2].get_ylabel().endswith(" *") and not fig.axes[0].get_ylabel().endswith(" *")


def test_the_example_prompts_parse_and_name_the_words_whose_maps_are_shown():
    for text, _ in du.EXAMPLE_PROMPTS:
        assert du.read_prompt(text).label is not None, text
    for text, words in du.ATTENTION_WORDS.items():
        assert set(words) <= set(du.prompt_token_names(text)), text
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        du.plot_prompt_grid(du.make_shapes(3).images, ["a circle", "a square"])


def test_a_prompt_checkpoint_round_trips(tmp_path):
    trainer = du.Trainer(prompt_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=1, progress=False)
    path = du.save_checkpoint(tmp_path / "prompt.pt", trainer)
    model, schedule = du.load_model(path)
    assert model.config == prompt_config()
    a = du.sample(model, schedule, 2, steps=2, prompt="a circle", progress=False).images
    b = du.sample(trainer.sampling_model, trainer.schedule, 2, steps=2, prompt="a circle", progress=False).images
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Scoring, word by word
# ------------------------------------------------------------------------------------------


def test_real_shapes_obey_their_own_captions_exactly():
    batch, texts = many_captions(1500, seed=21, dropout=0.2)
    metrics = du.evaluate_prompts(batch.images, texts)
    assert metrics["valid"] == 1.0 and metrics["matches"] == 1.0
    for metric in du.PROMPT_METRICS.values():
        assert metrics[metric] == (0.0 if metric.endswith("error") else 1.0), metric


def test_a_mismatched_word_scores_zero_for_its_kind():
    batch = du.make_shapes(400, seed=8)
    images = batch.images

    def words(k: int, kind: str) -> str:
        label, size, x = batch.labels[k], batch.sizes[k], batch.centers[k][0]
        wrong = {
            "class": du.CLASS_NAMES[1 - label],
            "size word": {"small": "large", "medium": "small", "large": "small"}[du.size_word(size)],
            "half": "right" if x < 31.5 else "left",
            "centre": "middle",
        }
        return wrong[kind]

    far = [k for k in range(len(batch)) if not du.is_centre(tuple(batch.centers[k]))]
    for kind, metric in (
        ("class", "class_accuracy"),
        ("size word", "size_word_accuracy"),
        ("half", "half_accuracy"),
        ("centre", "centre_accuracy"),
    ):
        chosen = far if kind == "centre" else list(range(len(batch)))
        scores = du.evaluate_prompts(images[chosen], [words(k, kind) for k in chosen])
        assert scores[metric] == 0.0 and scores["valid"] == 1.0, kind
    shifted = [f"at {x + 3:g}, {y:g}" for x, y in batch.centers[:50] if x + 3 <= 40]
    kept = [k for k, (x, _) in enumerate(batch.centers[:50]) if x + 3 <= 40]
    assert du.evaluate_prompts(images[kept], shifted)["center_error"] == pytest.approx(3.0, abs=0.51)


def test_scores_need_a_prompt_per_sample():
    with pytest.raises(ValueError, match="3 prompts for 2 samples"):
        du.evaluate_prompts(du.make_shapes(2).images, ["a circle"] * 3)
    assert du.evaluate_prompts(du.make_shapes(2).images, "a circle")["n"] == 2


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A prompt checkpoint and a request one, written by `train --steps 1`."""
    folder = tmp_path_factory.mktemp("prompts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            du,
            "default_configs",
            lambda device, objective="diffusion", conditioning="request": (
                tiny_model_config(conditional=True, text_width=16, conditioning=conditioning),
                tiny_train_config(),
            ),
        )
        for kind in ("prompt", "request"):
            argv = ["train", "--steps", "1", "--conditioning", kind, "--out", str(folder / f"{kind}.pt")]
            assert du.main([*argv, "--no-progress"]) == 0
    return folder / "prompt.pt", folder / "request.pt"


def test_train_sample_and_evaluate_a_prompt(checkpoints, tmp_path, capsys):
    prompt_path, request_path = checkpoints
    assert du.load_trainer(prompt_path).model_config.conditioning == "prompt"
    assert du.load_trainer(request_path).model_config.conditioning == "request"
    out = tmp_path / "s.npy"
    argv = ["sample", "--checkpoint", str(prompt_path), "--n", "3", "--steps", "2", "--out", str(out)]
    status, printed, err = run_main(capsys, *argv, "--no-progress", "--prompt", "a small circle on the left")
    assert status == 0 and err == "", err
    scores = json.loads(printed.splitlines()[1])
    assert scores["n"] == 3 and set(du.PROMPT_METRICS.values()) <= set(scores)
    status, printed, _ = run_main(capsys, "evaluate", str(out), "--prompt", "a small circle on the left")
    assert status == 0 and json.loads(printed)["prompt"]["n"] == 3
    status, printed, _ = run_main(capsys, *argv, "--no-progress", "--shape", "square", "--size", "25")
    assert status == 0 and json.loads(printed.splitlines()[1])["n"] == 3  # a request, written as a prompt


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prompt", "a blue circle"], "unknown word 'blue'"),
        (["--prompt", "a " * 20 + "circle"], "more than the encoder's 16"),
        (["--prompt", "a circle at 70, 30"], "outside the frame"),
        (["--prompt", "a circle 45 px"], "size must be within the data's 15-39 px"),
        (["--prompt", "a circle", "--shape", "circle"], "give --prompt or the request flags"),
    ],
)
def test_sample_with_a_bad_prompt(checkpoints, tmp_path, capsys, args, fragment):
    out = tmp_path / "s.npy"
    status, _, err = run_main(
        capsys, "sample", "--checkpoint", str(checkpoints[0]), "--out", str(out), "--no-progress", *args
    )
    assert_one_line_error(status, err, fragment)
    assert not out.exists()


def test_a_request_checkpoint_refuses_a_prompt(checkpoints, tmp_path, capsys):
    out = tmp_path / "s.npy"
    status, _, err = run_main(
        capsys, "sample", "--checkpoint", str(checkpoints[1]), "--out", str(out), "--prompt", "a circle"
    )
    assert_one_line_error(status, err, "this model reads requests")
    assert not out.exists()
    np.save(out, du.model_to_uint8(du.make_shapes(2).images))
    status, _, err = run_main(capsys, "evaluate", str(out), "--prompt", "a circle", "--size", "20")
    assert_one_line_error(status, err, "not both")


def test_the_prompt_recipe_reads_words_and_trains_at_shifted_times():
    request_model, request_train = du.default_configs("cpu", "flow")
    model, train = du.default_configs("cpu", "flow", "prompt")
    assert (request_model.conditioning, request_train.time_sampling) == ("request", "uniform")
    assert (model.conditioning, train.time_sampling) == ("prompt", "shifted")
    assert model == dataclasses.replace(request_model, conditioning="prompt", attention_heads=2)
    assert model.cross_attention_levels == 1 and request_model.attention_heads == 4
    ddpm_model, ddpm_train = du.default_configs("cpu", "diffusion", "prompt")  # the notebook's
    assert (ddpm_model.schedule, ddpm_model.conditioning, ddpm_train.time_sampling) == ("cosine", "prompt", "shifted")
    assert du.default_configs("cpu", "diffusion")[1].time_sampling == "uniform"
    with pytest.raises(ValueError, match="unknown conditioning 'words'"):
        du.default_configs("cpu", "flow", "words")


def test_cross_attention_levels_choose_the_decoder_levels_that_read_the_prompt():
    def reading(levels):
        model = du.UNet(prompt_config(cross_attention_levels=levels))
        return [isinstance(layer, du.CrossAttention) for layer in model.up_cross]

    assert reading(None) == [True, True] and reading(1) == [True, False] and reading(0) == [False, False]
    with pytest.raises(ValueError, match="cross_attention_levels must be None or 0-2"):
        prompt_config(cross_attention_levels=3)


def test_pixel_positions_are_each_pixels_centre_in_frame_pixels():
    """A 4x4 map's pixel covers 16 frame pixels: column j's centre is 16 j + 7.5, and so is row i's (for y)."""
    positions = du.pixel_positions(8, 4, 4)
    centres = torch.tensor([7.5, 23.5, 39.5, 55.5])
    expected = du.sinusoidal_embedding(centres, 4, max_period=du.ATTRIBUTE_PERIOD)  # (4 pixels, 4 features)
    assert positions.shape == (1, 8, 4, 4)
    assert torch.allclose(positions[0, :4, 2, :].T, expected) and torch.allclose(positions[0, 4:, :, 1].T, expected)
    assert torch.equal(positions[0, :4, 0], positions[0, :4, 3]) and torch.equal(
        positions[0, 4:, :, 0], positions[0, 4:, :, 2]
    )


@pytest.mark.parametrize("positions", [False, True])
def test_cross_attention_queries_know_their_place_only_with_positions(positions):
    """On a feature map that is the same everywhere, queries differ between pixels only when they carry positions."""
    torch.manual_seed(0)
    block = du.CrossAttention(8, 16, heads=2, positions=positions)
    q, _, _ = block._projections(torch.ones(1, 8, 4, 4), torch.randn(1, 3, 16))
    assert (q[0, :, 0] != q[0, :, 5]).any() == positions


def test_the_text_encoder_tells_a_number_as_x_from_the_same_number_as_y_from_the_start():
    """Learned positions at the tokens' scale: at initialisation, "20" as x ("at 20, 44") and as y ("at 44, 20")
    differ at least a third as much as "20" and "44" do; positions at 0.02 make them differ about 2 %."""
    assert du.prompt_token_names("circle at 20, 44") == ["circle", "at", "20", ",", "44"]  # the indices the share reads
    for seed in range(3):
        torch.manual_seed(seed)
        encoder = du.TextEncoder(64, 2, positions="learned", heads=4)
        assert du.number_role_share(encoder) > 1 / 3
        with torch.no_grad():
            encoder.positions.mul_(0.02)
        assert du.number_role_share(encoder) < 0.05


def test_rotary_turns_each_pair_by_position_times_its_frequency():
    """RoPE in closed form: in 2 dimensions (theta_0 = 1) the vector at position m is turned by m radians; in 4, the
    pairs (x_0, x_2) and (x_1, x_3) by m and m / sqrt(ROTARY_BASE)."""
    cos, sin = du.rotary_tables(5, 2)
    x = torch.tensor([1.0, 2.0]).expand(5, 2)
    m = torch.arange(5.0)
    expected = torch.stack([m.cos() * 1 - m.sin() * 2, m.sin() * 1 + m.cos() * 2], -1)
    assert torch.allclose(du.rotate(x, cos, sin), expected, atol=1e-6)
    cos, sin = du.rotary_tables(5, 4)
    slow = m / math.sqrt(du.ROTARY_BASE)
    turned = du.rotate(torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(5, 4), cos, sin)
    assert torch.allclose(turned[:, [0, 2]], torch.stack([m.cos(), m.sin()], -1), atol=1e-6)
    turned = du.rotate(torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(5, 4), cos, sin)
    assert torch.allclose(turned[:, [1, 3]], torch.stack([slow.cos(), slow.sin()], -1), atol=1e-6)


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = du.rotary_tables(12, 16)
    turned_q, turned_k = du.rotate(q.expand(12, 16), cos, sin), du.rotate(k.expand(12, 16), cos, sin)
    scores = turned_q @ turned_k.T  # (m, n): q at m against k at n
    for offset in (-3, 0, 2):
        diagonal = torch.diagonal(scores, offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 2])


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_only_rotary_positions_read_a_phrase_the_same_wherever_it_sits(positions):
    """Padding put before a phrase moves it along; a rotary layer's vectors for it do not change (it sees only
    distances), a learned-position encoder's do."""
    torch.manual_seed(0)
    encoder = du.TextEncoder(16, 1, positions, heads=4)
    words = torch.randn(2, 5, 16)
    moved = torch.cat([torch.zeros(2, 3, 16), words], 1)
    present = torch.tensor([[False] * 3 + [True] * 5] * 2)
    with torch.no_grad():
        if positions == "rotary":
            a, b = encoder.layers[0](words, present[:, 3:]), encoder.layers[0](moved, present)[:, 3:]
        else:
            (layer,) = encoder.layers
            a = layer(words + encoder.positions[:5], src_key_padding_mask=~present[:, 3:])
            b = layer(moved + encoder.positions[:8], src_key_padding_mask=~present)[:, 3:]
    assert torch.allclose(a, b, atol=1e-5) == (positions == "rotary")


def test_a_prompt_checkpoint_from_before_rotary_positions_loads_with_learned_ones(tmp_path):
    config = prompt_config(text_positions="learned")
    trainer = du.Trainer(config, tiny_train_config(), device="cpu")
    path = du.save_checkpoint(tmp_path / "learned.pt", trainer)
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["text_positions"]  # as files written before the field was added
    torch.save(payload, path)
    model, _ = du.load_model(path)
    assert model.config == config and model.text_encoder.positions is not None


def test_attention_heads_reach_every_attention_layer_and_one_head_is_the_written_out_formula():
    """ModelConfig.attention_heads sets the bottleneck's, the cross-attention's and the text layers' heads; heads only
    split the width, so both models hold the same parameters, and with one head a cross-attention block is
    x + out(softmax(Q K^T / sqrt(C)) V) over the tokens that are there, written out here."""
    one, four = (du.UNet(prompt_config(bottleneck_attention=True, attention_heads=h)) for h in (1, 4))
    layers = (du.SelfAttention, du.CrossAttention, du.TextLayer)
    for model, heads in [(one, 1), (four, 4)]:
        found = [m.heads for m in model.modules() if isinstance(m, layers)]
        assert len(found) == 4 and set(found) == {heads}  # bottleneck, mid cross, one decoder cross, one text layer
    assert [p.shape for p in one.parameters()] == [p.shape for p in four.parameters()]
    torch.manual_seed(0)
    block = perturbed(du.CrossAttention(8, 16, heads=1))
    x, text = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 16)
    present = torch.tensor([[True] * 5, [True, True, True, False, False]])
    q = block.query(block.norm(x)).flatten(2).transpose(1, 2)  # (N, H*W, C)
    k, v = block.key_value(text).chunk(2, dim=-1)
    scores = (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~present[:, None, :], -math.inf)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        assert torch.allclose(block(x, text, present), x + block.out(attended), atol=1e-5)
        block.heads = 2  # the same weights read in two heads: another function
        assert not torch.allclose(block(x, text, present), x + block.out(attended), atol=1e-3)


def test_a_checkpoint_from_before_attention_heads_loads_with_four(tmp_path):
    config = prompt_config(attention_heads=4)
    path = du.save_checkpoint(tmp_path / "four.pt", du.Trainer(config, tiny_train_config(), device="cpu"))
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["attention_heads"]  # as a file written without the field
    torch.save(payload, path)
    model, _ = du.load_model(path)
    assert model.config == config and model.mid_cross.heads == 4
