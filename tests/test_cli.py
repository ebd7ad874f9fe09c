"""Section 10: python diffusion_utils.py {train, sample, evaluate}, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_main, same_state, tiny_model_config, tiny_train_config

import diffusion_utils as du

ROOT = Path(du.__file__).resolve().parent


@pytest.fixture
def tiny_defaults(monkeypatch):
    """`train` builds the device's default recipe; make that a tiny model so the CLI runs in seconds."""

    def tiny(device, objective="diffusion", conditioning="request"):
        if objective == "flow":
            return tiny_model_config(schedule="flow", prediction="velocity"), tiny_train_config(
                min_snr_gamma=None, time_sampling="logit-normal"
            )
        return tiny_model_config(), tiny_train_config()

    monkeypatch.setattr(du, "default_configs", tiny)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `train --steps 2`, shared by the sample / evaluate tests."""
    path = tmp_path_factory.mktemp("cli") / "run.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            du,
            "default_configs",
            lambda device, objective="diffusion", conditioning="request": (tiny_model_config(), tiny_train_config()),
        )
        assert du.main(["train", "--steps", "2", "--out", str(path), "--no-progress", "--seed", "4"]) == 0
    return path


def test_train_writes_a_checkpoint(tiny_defaults, tmp_path, capsys):
    path = tmp_path / "out" / "run.pt"
    status, out, err = run_main(
        capsys, "train", "--steps", "3", "--out", str(path), "--no-progress", "--seed", "4", "--checkpoint-every", "2"
    )
    assert status == 0 and err == ""
    assert "trained to step 3 (12 images)" in out and str(path) in out
    trainer = du.load_trainer(path)
    assert trainer.step == 3 and trainer.train_config.seed == 4
    assert trainer.model_config == du.default_configs("cpu", du.DEFAULT_OBJECTIVE)[0]  # the default objective's


def test_train_resumes_from_a_checkpoint(checkpoint, tmp_path, capsys):
    path = tmp_path / "more.pt"
    status, out, _ = run_main(
        capsys, "train", "--steps", "1", "--resume", str(checkpoint), "--out", str(path), "--no-progress"
    )
    assert status == 0 and f"resuming from {checkpoint} at step 2" in out
    assert du.load_trainer(path).step == 3


def test_train_precision_must_suit_the_device(tiny_defaults, tmp_path, capsys):
    path = tmp_path / "run.pt"
    assert_one_line_error(
        *run_main(capsys, "train", "--steps", "1", "--out", str(path), "--device", "cpu", "--precision", "bf16")[::2],
        "precision 'bf16' needs a CUDA device",
    )
    assert not path.exists()
    status, out, _ = run_main(
        capsys, "train", "--steps", "1", "--out", str(path), "--device", "cpu", "--no-progress", "--precision", "fp32"
    )
    assert status == 0 and "precision fp32" in out


def test_train_refuses_a_seed_for_a_resumed_run(checkpoint, tmp_path, capsys):
    status, _, err = run_main(
        capsys,
        "train",
        "--steps",
        "1",
        "--resume",
        str(checkpoint),
        "--seed",
        "3",
        "--out",
        str(tmp_path / "x.pt"),
        "--no-progress",
    )
    assert_one_line_error(status, err, "--seed", "resumed run")
    assert not (tmp_path / "x.pt").exists()


def test_train_with_a_minute_budget(tiny_defaults, tmp_path, capsys):
    status, out, _ = run_main(
        capsys, "train", "--minutes", "0.0002", "--out", str(tmp_path / "run.pt"), "--no-progress"
    )
    assert status == 0 and "trained to step" in out  # however many steps fit
    trainer = du.load_trainer(tmp_path / "run.pt")
    assert f"trained to step {trainer.step} " in out and len(trainer.losses) == trainer.step


def test_train_when_not_even_one_step_fits_the_budget(tiny_defaults, tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 10**6, 1000))  # every reading of the clock is 1000 s later
    monkeypatch.setattr(du.time, "monotonic", lambda: float(next(clock)))
    status, out, err = run_main(capsys, "train", "--minutes", "1", "--out", str(tmp_path / "run.pt"), "--no-progress")
    assert (status, err) == (0, "")
    assert "trained to step 0 (0 images); no step fitted in the budget" in out
    assert du.load_trainer(tmp_path / "run.pt").step == 0


def test_sample_then_evaluate(checkpoint, tmp_path, capsys):
    samples, grid = tmp_path / "s.npy", tmp_path / "grid.png"
    status, out, err = run_main(
        capsys,
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--n",
        "3",
        "--steps",
        "4",
        "--out",
        str(samples),
        "--png",
        str(grid),
        "--no-progress",
    )
    assert status == 0 and err == ""
    assert f"saved 3 samples to {samples}" in out
    images = np.load(samples)
    assert images.shape == (3, 64, 64) and images.dtype == np.uint8
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same images as sampling the EMA model directly
    model, schedule = du.load_model(checkpoint)
    expected = du.model_to_uint8(du.sample(model, schedule, 3, steps=4, progress=False).images)
    assert np.array_equal(images, expected)

    status, out, err = run_main(capsys, "evaluate", str(samples))
    assert status == 0 and err == ""
    scores = json.loads(out)
    assert {"valid", "circle_share", "mid_gray", "size_w1", "position_w1"} <= set(scores)
    assert scores["n"] == 3 and 0.0 <= scores["valid"] <= 1.0


def test_sample_options_reach_the_sampler(checkpoint, tmp_path, capsys):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    common = [
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--n",
        "2",
        "--steps",
        "3",
        "--no-progress",
        "--sampler",
        "ddim",
    ]
    assert run_main(capsys, *common, "--seed", "1", "--batch-size", "1", "--out", str(a))[0] == 0
    assert run_main(capsys, *common, "--seed", "1", "--eta", "0", "--out", str(b))[0] == 0
    assert np.array_equal(np.load(a), np.load(b))  # chunking and the default eta change nothing
    assert run_main(capsys, *common, "--seed", "2", "--out", str(b))[0] == 0
    assert not np.array_equal(np.load(a), np.load(b))


def test_evaluate_scores_real_shapes_as_valid(tmp_path, capsys):
    path = tmp_path / "real.npy"
    np.save(path, du.model_to_uint8(du.make_shapes(32, seed=2).images))
    status, out, _ = run_main(capsys, "evaluate", str(path))
    assert status == 0 and json.loads(out)["valid"] == 1.0


# ------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line on stderr, never a traceback
# ------------------------------------------------------------------------------------------


def test_train_without_a_budget(tiny_defaults, tmp_path, capsys):
    assert_one_line_error(
        *run_main(capsys, "train", "--out", str(tmp_path / "x.pt"))[::2], "train: error", "--minutes M or --steps N"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--minutes", "-1"], "minutes must be > 0, got -1"),
        (["--steps", "2", "--checkpoint-every", "0"], "checkpoint_every"),
    ],
)
def test_train_with_a_bad_budget(tiny_defaults, tmp_path, capsys, args, fragment):
    assert_one_line_error(
        *run_main(capsys, "train", *args, "--out", str(tmp_path / "x.pt"), "--no-progress")[::2], fragment
    )
    assert not (tmp_path / "x.pt").exists()


def test_train_argument_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "x.pt")
    assert_one_line_error(
        *run_main(capsys, "train", "--steps", "2", "--minutes", "1", "--out", out)[::2], "not allowed with argument"
    )
    assert_one_line_error(*run_main(capsys, "train", "--steps", "two", "--out", out)[::2], "invalid int value: 'two'")
    assert_one_line_error(*run_main(capsys, "train", "--steps", "2")[::2], "--out")
    assert_one_line_error(*run_main(capsys, "paint")[::2], "invalid choice: 'paint'")
    assert_one_line_error(*run_main(capsys)[::2], "command")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_a_missing_device(tiny_defaults, tmp_path, capsys):
    assert_one_line_error(
        *run_main(capsys, "train", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "x.pt"))[::2],
        "CUDA is not available",
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--n", "0"], "n must be a positive integer, got 0"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--steps", "1001"], "steps=1001 needs 1001 timesteps of ddpm, more than the 1000 of training"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--sampler", "ddpm", "--eta", "0.5"], "eta applies to the ddim sampler only"),
        (["--sampler", "ddim", "--eta", "-1"], "eta must be >= 0"),
        (["--sampler", "euler"], "invalid choice: 'euler'"),
        (["--n", "many"], "invalid int value: 'many'"),
        (["--precision", "fp16", "--device", "cpu"], "precision 'fp16' needs a CUDA device; cpu runs in fp32"),
        (["--precision", "half"], "invalid choice: 'half'"),
    ],
)
def test_sample_with_bad_options(checkpoint, tmp_path, capsys, args, fragment):
    assert_sample_refuses(checkpoint, tmp_path, capsys, args, fragment)


def assert_sample_refuses(checkpoint, tmp_path, capsys, args, fragment):
    """`sample` with these arguments fails with one line holding `fragment`, and writes no samples."""
    out = tmp_path / "s.npy"
    status, _, err = run_main(
        capsys, "sample", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *args
    )
    assert_one_line_error(status, err, fragment)
    assert not out.exists()


def test_sample_output_must_be_npy(checkpoint, tmp_path, capsys):
    assert_one_line_error(
        *run_main(capsys, "sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.png"))[::2],
        "--out must end in .npy",
    )


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated"])
def test_sample_from_a_bad_checkpoint(checkpoint, tmp_path, capsys, kind):
    path = tmp_path / "bad.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:1000])
    status, _, err = run_main(
        capsys, "sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.npy"), "--no-progress"
    )
    assert_one_line_error(status, err, "sample: error", str(path))


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.full((2, 64, 64), 255.0), "must lie in [0, 1] or [-1, 1], got values in [255, 255]"),
        (np.zeros((2, 64, 64), np.int64), "uint8 in [0, 255] or floats in [0, 1] or [-1, 1], got int64"),
        (np.zeros((2, 3, 64, 64), np.uint8), "(N, 64, 64) images, got shape (2, 3, 64, 64)"),
        (np.zeros((2, 32, 32), np.uint8), "is 32x32 pixels, not the 64x64 of the images"),
        (np.zeros((0, 64, 64), np.uint8), "got shape (0, 64, 64)"),
        (np.array([{"a": 1}], dtype=object), "not a plain .npy array"),
    ],
)
def test_evaluate_a_bad_samples_file(tmp_path, capsys, array, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    assert_one_line_error(*run_main(capsys, "evaluate", str(path))[::2], "evaluate: error", fragment)


@pytest.mark.parametrize(
    "content", [None, b"", b"not numpy at all", b"\x93NUMPY\x01\x00"], ids=["missing", "empty", "text", "cut header"]
)
def test_evaluate_a_file_that_is_not_an_array(tmp_path, capsys, content):
    path = tmp_path / "bad.npy"
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(*run_main(capsys, "evaluate", str(path))[::2], str(path))


def test_the_script_itself_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((3, 64, 64), 2.0, np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "diffusion_utils.py"), "evaluate", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"diffusion_utils.py evaluate: error: {bad}: float samples must lie in [0, 1] or [-1, 1], got values in [2, 2]"
    ]


# ------------------------------------------------------------------------------------------
# Found when tried as a new user would
# ------------------------------------------------------------------------------------------


def test_evaluate_prints_strict_json_when_nothing_is_valid(tmp_path, capsys):
    """No valid sample leaves the circle share and the distances undefined: null, never the NaN token."""
    path = tmp_path / "blank.npy"
    np.save(path, np.zeros((3, 64, 64), np.uint8))
    status, out, _ = run_main(capsys, "evaluate", str(path))

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    metrics = json.loads(out, parse_constant=refuse)
    assert status == 0 and metrics["valid"] == 0.0
    assert metrics["circle_share"] is None and metrics["size_w1"] is None and metrics["position_w1"] is None


def test_evaluate_on_a_checkpoint_says_it_is_not_a_samples_array(checkpoint, capsys):
    assert_one_line_error(
        *run_main(capsys, "evaluate", str(checkpoint))[::2], "not a samples .npy array", "zip archive"
    )


def test_a_bad_budget_is_refused_before_the_model_is_built(tiny_defaults, tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(du, "UNet", lambda *args, **kwargs: built.append(args) or pytest.fail("built a model"))
    status, out, err = run_main(capsys, "train", "--minutes", "-5", "--out", str(tmp_path / "x.pt"))
    assert_one_line_error(status, err, "minutes must be > 0, got -5")
    assert out == "" and not built


# ------------------------------------------------------------------------------------------
# Samplers and requests from the command line
# ------------------------------------------------------------------------------------------


def test_the_sampler_choices_come_from_the_registry(capsys):
    with pytest.raises(SystemExit):
        du.main(["sample", "--help"])
    assert "{" + ",".join(du.SAMPLERS) + "}" in capsys.readouterr().out


def test_sample_with_dpm_solver(checkpoint, tmp_path, capsys):
    out = tmp_path / "dpm.npy"
    status, _, err = run_main(
        capsys,
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--n",
        "3",
        "--sampler",
        "dpm++",
        "--steps",
        "5",
        "--out",
        str(out),
        "--no-progress",
    )
    assert status == 0 and err == "" and np.load(out).shape == (3, 64, 64)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "conditional.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            du,
            "default_configs",
            lambda device, objective="diffusion", conditioning="request": (tiny_model_config(), tiny_train_config()),
        )
        assert du.main(["train", "--steps", "2", "--conditional", "--out", str(path), "--no-progress"]) == 0
    return path


def test_train_takes_both_conditional_flags(tiny_defaults, tmp_path, capsys):
    for flag, expected in (("--conditional", True), ("--no-conditional", False)):
        path = tmp_path / f"{flag}.pt"
        assert run_main(capsys, "train", "--steps", "1", flag, "--out", str(path), "--no-progress")[0] == 0
        assert du.load_trainer(path).model_config.conditional is expected
    status, _, err = run_main(
        capsys, "train", "--steps", "1", "--resume", str(path), "--conditional", "--out", str(path)
    )
    assert_one_line_error(status, err, "a resumed run keeps its own model")


def test_sample_a_request_and_score_it(conditional_checkpoint, tmp_path, capsys):
    out = tmp_path / "asked.npy"
    argv = [
        "sample",
        "--checkpoint",
        str(conditional_checkpoint),
        "--n",
        "4",
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    status, printed, err = run_main(
        capsys, *argv, "--shape", "circle", "--size", "25", "--center", "30,34", "--guidance", "2"
    )
    assert status == 0 and err == ""
    scores = json.loads(printed.splitlines()[1])
    assert set(scores) == {"n", "valid", "class_accuracy", "matches", "center_error", "size_error"} and scores["n"] == 4
    status, printed, _ = run_main(
        capsys, "evaluate", str(out), "--shape", "circle", "--size", "25", "--center", "30,34"
    )
    assert status == 0 and json.loads(printed)["request"]["n"] == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--shape", "triangle"], "invalid choice: 'triangle'"),
        (["--shape", "circle", "--size", "50"], "size must be within the data's 15-39 px, got 50.0"),
        (
            ["--shape", "square", "--size", "39", "--center", "5,32"],
            "puts a 39 px shape outside the frame's 4 px margin",
        ),
        (["--shape", "circle", "--guidance", "-1"], "guidance must be a number >= 0, got -1.0"),
        (["--shape", "circle", "--center", "30"], "expected X,Y in pixels"),
        (["--shape", "circle", "--center", "a,b"], "expected X,Y in pixels"),
        (["--guidance", "2"], "--guidance steers towards a request"),
    ],
)
def test_sample_with_a_bad_request(conditional_checkpoint, tmp_path, capsys, args, fragment):
    assert_sample_refuses(conditional_checkpoint, tmp_path, capsys, args, fragment)


def test_an_unconditional_checkpoint_refuses_a_request(checkpoint, tmp_path, capsys):
    out = tmp_path / "s.npy"
    status, _, err = run_main(
        capsys, "sample", "--checkpoint", str(checkpoint), "--shape", "circle", "--out", str(out), "--no-progress"
    )
    assert_one_line_error(status, err, "this model is unconditional")
    assert not out.exists()


def test_an_interrupted_run_resumed_without_a_budget_ends_where_the_uninterrupted_one_does(
    tiny_defaults, capsys, tmp_path, monkeypatch
):
    straight, run = tmp_path / "straight.pt", tmp_path / "run.pt"
    assert (
        run_main(capsys, "train", "--steps", "12", "--checkpoint-every", "4", "--out", str(straight), "--no-progress")[
            0
        ]
        == 0
    )
    real_save, saves = du.save_checkpoint, []

    def save_then_die_after_step_8(path, trainer):
        real_save(path, trainer)
        saves.append(trainer.step)
        if trainer.step == 8:
            raise KeyboardInterrupt  # the process stops here; what was saved is all that survives

    monkeypatch.setattr(du, "save_checkpoint", save_then_die_after_step_8)
    status, _, err = run_main(
        capsys, "train", "--steps", "12", "--checkpoint-every", "4", "--out", str(run), "--no-progress"
    )
    assert status == 130 and saves == [4, 8] and "the last checkpoint written is intact" in err
    monkeypatch.setattr(du, "save_checkpoint", real_save)
    status, out, _ = run_main(capsys, "train", "--resume", str(run), "--out", str(run), "--no-progress")
    assert status == 0 and "resuming from" in out and "trained to step 12" in out
    a, b = du.read_checkpoint(straight)["state"], du.read_checkpoint(run)["state"]
    assert (
        same_state(a["model"], b["model"]) and same_state(a["ema"], b["ema"]) and torch.equal(a["losses"], b["losses"])
    )
    before = run.read_bytes()
    status, _, err = run_main(capsys, "train", "--resume", str(run), "--out", str(run), "--no-progress")
    assert_one_line_error(status, err, "this run's plan is complete at step 12")
    assert run.read_bytes() == before  # nothing written


def test_train_the_flow_and_sample_it_without_a_flag(tiny_defaults, tmp_path, capsys):
    path = tmp_path / "flow.pt"
    status, out, _ = run_main(
        capsys, "train", "--objective", "flow", "--steps", "2", "--out", str(path), "--no-progress"
    )
    assert status == 0
    trainer = du.load_trainer(path)
    assert (trainer.model_config.schedule, trainer.model_config.prediction) == ("flow", "velocity")
    assert trainer.train_config.time_sampling == "logit-normal"
    samples = tmp_path / "flow.npy"
    for sampler in du.SAMPLERS:
        status, out, err = run_main(
            capsys,
            "sample",
            "--checkpoint",
            str(path),
            "--n",
            "2",
            "--steps",
            "3",
            "--sampler",
            sampler,
            "--out",
            str(samples),
            "--no-progress",
        )
        assert status == 0 and err == "" and np.load(samples).shape == (2, 64, 64), sampler


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["sample", "--checkpoint", "x.pt", "--objective", "flow", "--out", "x.npy"],
            "unrecognized arguments: --objective",
        ),
        (["train", "--objective", "score", "--steps", "2", "--out", "x.pt"], "invalid choice: 'score'"),
        (["train", "--resume", "x.pt", "--objective", "flow", "--out", "x.pt"], "drop --conditional, --objective"),
    ],
)
def test_objective_errors_are_one_line(tiny_defaults, tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, *args)
    assert_one_line_error(status, err, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing written
