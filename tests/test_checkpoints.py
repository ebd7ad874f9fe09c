"""Section 9: checkpoints round-trip, are written atomically and are loaded safely."""

import dataclasses
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import same_state, tiny_model_config

import diffusion_utils as du

ROOT = Path(du.__file__).resolve().parent


def tmp_files(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f".{name}.*.tmp"))


# ------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------


def test_round_trip_restores_everything(trained):
    trainer, path = trained
    loaded = du.load_trainer(path)
    assert loaded.model_config == trainer.model_config and loaded.train_config == trainer.train_config
    assert same_state(loaded.model.state_dict(), trainer.model.state_dict())
    assert same_state(loaded.ema.model.state_dict(), trainer.ema.model.state_dict())
    assert loaded.ema.updates == trainer.ema.updates == 3
    assert (loaded.step, loaded.images_seen, loaded.losses) == (3, 12, trainer.losses)
    assert torch.equal(loaded.generator.get_state(), trainer.generator.get_state())
    assert (
        loaded.plan == trainer.plan == du.TrainingPlan(first_step=0, steps=3, seconds_spent=loaded.plan.seconds_spent)
    )
    ours, theirs = loaded.optimizer.state_dict(), trainer.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for key, state in theirs["state"].items():
        assert same_state(ours["state"][key], state)


def test_checkpoint_holds_plain_data_only(trained):
    _, path = trained
    payload = du.read_checkpoint(path)
    assert payload["format"] == du.CHECKPOINT_FORMAT
    assert payload["model_config"] == dataclasses.asdict(tiny_model_config())
    assert payload["state"]["step"] == 3
    assert torch.load(path, weights_only=True)["format"] == du.CHECKPOINT_FORMAT  # loads without unpickling code


def test_load_model_returns_the_ema_or_the_raw_weights(trained):
    trainer, path = trained
    ema, schedule = du.load_model(path)
    raw, _ = du.load_model(path, prefer_ema=False)
    assert not ema.training and not raw.training
    assert same_state(ema.state_dict(), trainer.ema.model.state_dict())
    assert same_state(raw.state_dict(), trainer.model.state_dict())
    assert not same_state(ema.state_dict(), raw.state_dict())
    assert len(schedule) == 1000 and torch.equal(schedule.alpha_bars, trainer.schedule.alpha_bars)


def test_save_creates_missing_folders_and_leaves_no_temp_file(trained, tmp_path):
    trainer, _ = trained
    path = du.save_checkpoint(tmp_path / "a" / "b" / "run.pt", trainer)
    assert path == tmp_path / "a" / "b" / "run.pt" and path.is_file()
    assert tmp_files(path.parent, "run.pt") == []
    assert du.load_trainer(path).step == 3


def test_a_failed_save_keeps_the_old_file_and_removes_its_temp_file(trained, tmp_path, monkeypatch):
    trainer, source = trained
    path = tmp_path / "run.pt"
    path.write_bytes(source.read_bytes())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        du.save_checkpoint(path, trainer)
    assert path.read_bytes() == source.read_bytes()
    assert tmp_files(tmp_path, "run.pt") == []


KILLED_WRITER = textwrap.dedent(
    """
    import sys, types
    sys.path.insert(0, sys.argv[2])
    import torch
    import diffusion_utils as du

    # save_checkpoint only needs the configs and state_dict(): 32 MB of weights, saved over and over
    big = types.SimpleNamespace(
        model_config=du.ModelConfig(base_channels=48),
        train_config=du.TrainConfig(),
        state_dict=lambda: {"model": {"w": torch.ones(8_000_000)}},
    )
    while True:
        du.save_checkpoint(sys.argv[1], big)
    """
)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(trained, tmp_path):
    trainer, source = trained
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    path = tmp_path / "run.pt"
    path.write_bytes(source.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(5):  # retried only if the kill happened to land between two saves
        process = subprocess.Popen(
            [sys.executable, str(script), str(path), str(ROOT)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 300  # generous: importing torch on a loaded machine is slow
        try:
            while not tmp_files(tmp_path, "run.pt"):  # the writer has started a save
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the writer never started a temp file"
                time.sleep(0.0005)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        leftovers = tmp_files(tmp_path, "run.pt")
        # whatever happened, the checkpoint is a whole file: the old one, or a complete new one
        if path.read_bytes() == source.read_bytes():
            assert du.load_trainer(path).step == trainer.step
        else:
            assert du.read_checkpoint(path)["state"]["model"]["w"].numel() == 8_000_000
        if leftovers:  # killed mid-save: the half-written file is only ever the temp file
            du.save_checkpoint(path, trainer)  # the next save clears what the killed one left
            assert tmp_files(tmp_path, "run.pt") == [] and du.load_trainer(path).step == trainer.step
            return
    pytest.fail("no kill landed during a save in 5 tries")


# ------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this object opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(Payload(control))).close()  # the payload is live: plain unpickling runs it
    assert control.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": du.CHECKPOINT_FORMAT, "model_config": {}, "state": Payload(marker)}, path)
    for load in (du.read_checkpoint, du.load_trainer, du.load_model):
        with pytest.raises(du.CheckpointError, match=re.escape(str(path)) + ".*pickled objects"):
            load(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "plain dict", "text", "missing", "folder"])
def test_files_that_are_not_checkpoints_are_refused_naming_the_file(trained, tmp_path, kind):
    _, source = trained
    path = tmp_path / f"{kind.replace(' ', '_')}.pt"
    data = source.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "plain dict":
        torch.save({"a": 1}, path)
    elif kind == "text":
        path.write_text("step: 3\n")
    elif kind == "folder":
        path.mkdir()
    expected = {
        "empty": "empty",
        "plain dict": "not a diffusion_patterns checkpoint",
        "missing": "no such checkpoint",
        "folder": "no such checkpoint",
    }
    with pytest.raises(
        du.CheckpointError, match=re.escape(str(path)) + ".*" + expected.get(kind, "not a readable checkpoint")
    ) as error:
        du.load_trainer(path)
    assert isinstance(error.value, ValueError)  # the CLI reports it as one line


def test_a_different_configuration_is_named(trained):
    _, path = trained
    expect = tiny_model_config(base_channels=16, prediction="eps")
    with pytest.raises(
        du.CheckpointError,
        match=r"different model configuration: prediction='v' in the file, 'eps' expected, "
        r"base_channels=8 in the file, 16 expected",
    ):
        du.load_trainer(path, expect=expect)
    assert du.load_trainer(path, expect=tiny_model_config()).step == 3


def _tampered(source: Path, target: Path, change) -> Path:
    payload = torch.load(source, weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def test_a_state_dict_that_does_not_fit_the_model_is_a_clear_error(trained, tmp_path):
    _, source = trained
    path = _tampered(source, tmp_path / "wider.pt", lambda p: p["model_config"].update(base_channels=16))
    with pytest.raises(
        du.CheckpointError,
        match=re.escape(str(path)) + r": does not match its model: .*size mismatch for time_mlp\.0\.weight",
    ):
        du.load_trainer(path)
    path = _tampered(source, tmp_path / "no-optimizer.pt", lambda p: p["state"].pop("optimizer"))
    with pytest.raises(du.CheckpointError, match="does not match its model: 'optimizer'"):
        du.load_trainer(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["model_config"].update(num_timesteps=0), "num_timesteps must be a positive integer, got 0"),
        (lambda p: p["model_config"].update(schedule="quadratic"), "unknown schedule 'quadratic'"),
        (lambda p: p["train_config"].update(lr=-1.0), "lr must be > 0"),
        (lambda p: p["model_config"].update(colour=True), "colour"),
        (lambda p: p.pop("train_config"), "train_config"),
    ],
)
def test_an_invalid_configuration_in_the_file_is_named(trained, tmp_path, change, message):
    _, source = trained
    path = _tampered(source, tmp_path / "bad.pt", change)
    with pytest.raises(
        du.CheckpointError, match=re.escape(str(path)) + ": its configuration is invalid: .*" + re.escape(message)
    ):
        du.load_trainer(path)


def test_a_checkpoint_from_another_device_type_loads_with_a_reseeded_generator(trained, tmp_path):
    """A CUDA generator state (16 bytes) cannot be set on a CPU generator: resume reseeds instead."""
    _, path = trained

    def as_if_from_cuda(payload):
        payload["state"]["generator"] = torch.zeros(16, dtype=torch.uint8)
        payload["state"]["generator_device"] = "cuda"

    moved = du.load_trainer(_tampered(path, tmp_path / "cuda.pt", as_if_from_cuda))
    seed = moved.train_config.seed * 1_000_003 + moved.step
    assert torch.equal(moved.generator.get_state(), torch.Generator().manual_seed(seed).get_state())
    model, _ = du.load_model(tmp_path / "cuda.pt")  # sampling never needs the generator
    assert same_state(model.state_dict(), moved.ema.model.state_dict())


def as_format_1(payload: dict) -> None:
    """A payload as the last release of format "diffusion_patterns/1" wrote it (its fields, no plan)."""
    payload["format"] = "diffusion_patterns/1"
    payload["train_config"]["compile"] = payload["train_config"].pop("compile_model")
    payload["train_config"]["condition_dropout_all"] = 0.0
    payload["state"].pop("plan")
    payload["state"]["lr_schedule"] = {"base_lrs": [1e-3], "last_epoch": 3}


def test_a_format_1_checkpoint_loads_as_it_was_trained(trained, tmp_path):
    trainer, path = trained
    old = _tampered(path, tmp_path / "format1.pt", as_format_1)
    loaded = du.load_trainer(old)
    assert loaded.model_config == trainer.model_config and loaded.train_config == trainer.train_config
    assert same_state(loaded.model.state_dict(), trainer.model.state_dict()) and loaded.step == trainer.step
    assert loaded.plan is None  # format 1 had no plan: a resumed run needs a budget
    with pytest.raises(ValueError, match="give a training budget"):
        loaded.train(progress=False)
    model, _ = du.load_model(old)
    assert same_state(model.state_dict(), trainer.ema.model.state_dict())


@pytest.mark.parametrize("missing", [("train_config", "min_snr_form"), ("model_config", "conditional")])
def test_an_early_format_1_checkpoint_is_refused_naming_the_format_and_what_it_lacks(trained, tmp_path, missing):
    """Files from before these fields existed trained without them; guessing their values could load them wrongly."""
    _, path = trained

    def early(payload):
        as_format_1(payload)
        del payload[missing[0]][missing[1]]

    old = _tampered(path, tmp_path / "early.pt", early)
    message = re.escape(f"{old}: an early 'diffusion_patterns/1' checkpoint without {missing[1]} in its configuration")
    for load in (du.load_trainer, du.load_model):
        with pytest.raises(du.CheckpointError, match=message):
            load(old)


def test_a_format_1_checkpoint_with_whole_requests_hidden_is_refused(trained, tmp_path):
    _, path = trained

    def hiding(payload):
        as_format_1(payload)
        payload["train_config"]["condition_dropout_all"] = 0.2

    with pytest.raises(du.CheckpointError, match="trained with condition_dropout_all"):
        du.load_trainer(_tampered(path, tmp_path / "hiding.pt", hiding))


def test_a_resumed_optimizer_uses_the_kernel_of_its_own_device(trained, tmp_path):
    """AdamW's saved param_groups carry `fused`; an MPS run's unfused AdamW must not follow it
    onto the CPU or a GPU (where it would be slower, and GradScaler would sync), nor the reverse."""
    _, path = trained

    def as_if_from_mps(payload):
        for group in payload["state"]["optimizer"]["param_groups"]:
            group["fused"] = None

    moved = du.load_trainer(_tampered(path, tmp_path / "unfused.pt", as_if_from_mps))
    assert [g["fused"] for g in moved.optimizer.param_groups] == [True]  # the CPU's kernel
    assert (
        moved.optimizer.param_groups[0]["lr"] == du.read_checkpoint(path)["state"]["optimizer"]["param_groups"][0]["lr"]
    )
    moved.train(steps=1, progress=False)  # the fused kernel runs on the loaded state
    # the reverse: a fused state loaded where the kernel is not fused (as on MPS)
    unfused = du.Trainer(moved.model_config, moved.train_config, device="cpu")
    for group in unfused.optimizer.param_groups:
        group["fused"] = None
    unfused.load_state_dict(du.read_checkpoint(path)["state"])
    assert [g["fused"] for g in unfused.optimizer.param_groups] == [None]


def test_load_trainer_can_switch_compilation_without_changing_anything_else(tmp_path):
    trainer = du.Trainer(
        tiny_model_config(),
        dataclasses.replace(du.TrainConfig(batch_size=4, channels_last=False), compile_model=True),
        device="cpu",
    )
    du.save_checkpoint(tmp_path / "compiled.pt", trainer)  # torch.compile is lazy: nothing compiles here
    eager = du.load_trainer(tmp_path / "compiled.pt", compile_model=False)
    assert eager.train_config == dataclasses.replace(trainer.train_config, compile_model=False)
    assert eager.train_model is eager.model
    assert du.load_trainer(tmp_path / "compiled.pt").train_config.compile_model  # by default the file's setting


def test_load_trainer_passes_the_precision_on(trained):
    _, path = trained
    assert du.load_trainer(path, device="cpu").precision == "fp32"
    assert du.load_trainer(path, device="cpu", precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        du.load_trainer(path, device="cpu", precision="fp16")


def test_the_next_save_removes_stale_temp_files_of_its_own_checkpoint_only(trained, tmp_path):
    trainer, _ = trained
    stale = [tmp_path / ".run.pt.abc123.tmp", tmp_path / ".run.pt.x.tmp"]
    other = tmp_path / ".other.pt.abc123.tmp"  # another checkpoint's write, maybe still running
    for path in [*stale, other]:
        path.write_bytes(b"half a checkpoint")
    du.save_checkpoint(tmp_path / "run.pt", trainer)
    assert not any(path.exists() for path in stale) and other.exists()
    assert du.load_trainer(tmp_path / "run.pt").step == trainer.step
