"""Section 13: tuning a trained model to sample in a few evaluations (consistency, progressive, reflow), its
checkpoints, its sampler, and the distill command."""

import numpy as np
import pytest
import torch
from helpers import (
    FlowOracle,
    Oracle,
    assert_one_line_error,
    constant_denoiser,
    run_main,
    same_state,
    state,
    tiny_model_config,
    tiny_train_config,
)

import diffusion_utils as du

SCHEDULE = du.NoiseSchedule.create("cosine", 1000)


def shapes(n: int = 4, seed: int = 3) -> torch.Tensor:
    return du.make_shapes(n, seed=seed).images


def tiny_unet(seed: int = 0, **overrides) -> du.UNet:
    torch.manual_seed(seed)
    return du.UNet(tiny_model_config(**overrides)).eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny diffusion checkpoint after 2 training steps: the teacher of the tests."""
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=2, progress=False)
    return du.save_checkpoint(tmp_path_factory.mktemp("teacher") / "base.pt", trainer)


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    model = tiny_model_config(schedule="flow", prediction="velocity")
    trainer = du.Trainer(model, tiny_train_config(min_snr_gamma=None, time_sampling="logit-normal"), device="cpu")
    trainer.train(steps=2, progress=False)
    return du.save_checkpoint(tmp_path_factory.mktemp("flow") / "base.pt", trainer)


# --- the targets, against perfect teachers and steps computed by hand -------------------------------------------


@pytest.mark.parametrize("t, r", [(999, 499), (300, 120), (40, -1), (999, -1)])
def test_a_perfect_teacher_and_student_agree_on_the_clean_image(t, r):
    x0 = shapes()
    oracle = Oracle(SCHEDULE, x0, "v")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    index = torch.full((len(x0),), t)
    x_t = SCHEDULE.noised(x0, noise, index)
    target = du.consistency_target(oracle, oracle, SCHEDULE, "v", x_t, index, torch.full((len(x0),), r))
    assert torch.allclose(target, x0, atol=1e-4)


def test_a_perfect_teacher_pairs_x_t_with_the_same_noise_one_step_down():
    """With a perfect teacher, x_r is the forward process at r on x_t's own noise (ECT's pair); the target is the
    student's estimate there, whatever the student."""
    x0 = shapes()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t, r = torch.full((4,), 700), torch.full((4,), 350)
    student = Oracle(SCHEDULE, shapes(seed=9), "v")  # a student that is wrong about x0
    target = du.consistency_target(
        student, Oracle(SCHEDULE, x0, "v"), SCHEDULE, "v", SCHEDULE.noised(x0, noise, t), t, r
    )
    x_r = SCHEDULE.noised(x0, noise, r)
    expected = du.network_x0(student, SCHEDULE, "v", x_r, r).clamp(-1, 1)
    assert torch.allclose(target, expected, atol=1e-4)
    assert not torch.allclose(target, x0, atol=1e-2)


def test_a_perfect_teacher_gives_progressive_distillation_the_clean_image():
    x0 = shapes()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    grid = du.trailing_grid(SCHEDULE, 8)
    for k in range(4):
        t, middle = torch.full((4,), int(grid[2 * k + 1])), torch.full((4,), int(grid[2 * k]))
        end = torch.full((4,), int(grid[2 * k - 1]) if k else -1)
        x_t = SCHEDULE.noised(x0, noise, t)
        target = du.progressive_target(Oracle(SCHEDULE, x0, "v"), SCHEDULE, "v", x_t, t, middle, end)
        assert torch.allclose(target, x0, atol=1e-3), k


@pytest.mark.parametrize("end", [250, -1])
def test_one_student_step_to_the_target_lands_where_two_teacher_ddim_steps_do(end):
    teacher = tiny_unet(seed=5)
    t, middle = 800, 500
    x_t = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    index = lambda i: torch.full((3,), i)  # noqa: E731
    target = du.progressive_target(teacher, SCHEDULE, "v", x_t, index(t), index(middle), index(end))
    # the teacher's two DDIM steps, by the sampler of section 7
    kept = [middle, t] if end < 0 else [end, middle, t]
    spaced = SCHEDULE.at(torch.tensor(kept))
    denoise = du.make_denoiser(lambda x, time: teacher(x, time), spaced, "v")
    top = len(kept) - 1
    x_end = du.ddim_step(spaced, top - 1, du.ddim_step(spaced, top, x_t, denoise, state()), denoise, state())
    # one DDIM step of the student from t to end, with the target as its x0
    student_grid = SCHEDULE.at(torch.tensor([t] if end < 0 else [end, t]))
    landed = du.ddim_step(student_grid, len(student_grid) - 1, x_t, constant_denoiser(target), state())
    assert torch.allclose(landed, x_end, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32])
def test_the_student_grid_is_every_other_point_of_the_teacher_grid(steps):
    for schedule in (SCHEDULE, du.NoiseSchedule.create("flow", 1000)):
        student = du.trailing_grid(schedule, steps)
        assert torch.equal(student, du.trailing_grid(schedule, 2 * steps)[1::2])
        assert torch.equal(schedule.respaced(steps, "time-trailing").timesteps, schedule.timesteps[student])


def test_a_perfect_flow_teacher_pairs_noise_with_its_image():
    x0 = shapes()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    images = du.reflow_pairs(FlowOracle(x0), du.NoiseSchedule.create("flow", 1000), noise, 4)
    assert torch.allclose(images, x0, atol=1e-3)


def test_the_consistency_curriculum_grows_from_an_eighth_to_the_finest_grid():
    record = du.Distillation.of("consistency")
    grids = [du.consistency_grid(record, p) for p in (0.0, 0.5, 1.0, 2.0)]
    assert grids == [8, 23, 64, 64]


# --- the consistency sampler ---------------------------------------------------------------------------------------


def test_one_consistency_step_is_the_students_estimate_at_pure_noise():
    model = tiny_unet(seed=6)
    x_T = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    result = du.sample(model, SCHEDULE, 3, steps=1, sampler="consistency", initial_noise=x_T, progress=False)
    estimate = du.network_x0(model, SCHEDULE, "v", x_T, torch.full((3,), 999)).clamp(-1, 1)
    assert torch.allclose(result.images, estimate, atol=1e-5)


def test_a_consistency_step_noises_the_estimate_again_to_the_next_time():
    spaced = SCHEDULE.respaced(2, "time-trailing")
    x0_hat, z = torch.full((1, 1, 64, 64), 0.5), torch.randn(1, 1, 64, 64)
    denoise = constant_denoiser(x0_hat)
    ab = float(SCHEDULE.alpha_bars[int(spaced.timesteps[0])])
    renoised = du.consistency_step(spaced, 1, torch.zeros_like(z), denoise, state(z))
    assert torch.allclose(renoised, ab**0.5 * x0_hat + (1 - ab) ** 0.5 * z, atol=1e-6)
    assert torch.equal(du.consistency_step(spaced, 0, renoised, denoise, state()), x0_hat)


# --- the Distiller: a Trainer with a frozen teacher ----------------------------------------------------------------


def test_the_student_starts_as_the_teacher_and_the_teacher_stays_frozen(teacher):
    model, _ = du.load_model(teacher)
    distiller = du.distiller_from(teacher, "consistency", "cpu")
    assert same_state(distiller.model.state_dict(), model.state_dict())
    distiller.train(steps=2, progress=False)
    assert same_state(distiller.teacher.state_dict(), model.state_dict())
    assert not same_state(distiller.model.state_dict(), model.state_dict())


@pytest.mark.parametrize("method", ["consistency", "progressive"])
def test_a_resumed_distillation_retraces_the_uninterrupted_one(teacher, tmp_path, method):
    """The step-2 checkpoint of a 4-step plan (kept aside while the run goes on), resumed without a budget, ends
    bit for bit where the run did: the progressive rounds (at steps 2 and 3) and their teachers included."""
    path, halfway = tmp_path / "fast.pt", tmp_path / "half.pt"

    def keep_halfway(trainer):
        if trainer.step == 3:  # the checkpoint of step 2 is on disk
            halfway.write_bytes(path.read_bytes())

    whole = du.distiller_from(teacher, method, "cpu", seed=1)
    whole.train(steps=4, progress=False, checkpoint_path=path, checkpoint_every=2, on_log=keep_halfway)
    resumed = du.load_trainer(halfway, "cpu")
    assert isinstance(resumed, du.Distiller) and resumed.step == 2
    resumed.train(progress=False)
    assert resumed.step == 4 and resumed.distillation == whole.distillation and resumed.round == whole.round
    assert same_state(resumed.model.state_dict(), whole.model.state_dict())
    assert same_state(resumed.ema.model.state_dict(), whole.ema.model.state_dict())
    assert same_state(resumed.teacher.state_dict(), whole.teacher.state_dict())
    if method == "consistency":  # its target network, an average of the student, comes back too
        assert same_state(resumed.target_network.state_dict(), whole.target_network.state_dict())
    if method == "progressive":
        assert whole.round == 2 and whole.distillation.steps == 1


def test_the_target_network_follows_the_student_by_its_decay(teacher):
    distiller = du.distiller_from(teacher, "consistency", "cpu", target_decay=0.75)

    def weights(net):
        return {name: value.detach().clone() for name, value in net.named_parameters()}

    before = weights(distiller.target_network)
    distiller.train(steps=1, progress=False)
    after, student = weights(distiller.target_network), weights(distiller.model)
    for name, value in before.items():  # target = 0.75 target + 0.25 student, the student after its step
        assert torch.allclose(after[name], 0.75 * value + 0.25 * student[name], atol=1e-6), name
    assert not same_state(after, before)
    assert du.distiller_from(teacher, "consistency", "cpu", target_decay=None).target_network is None
    assert du.distiller_from(teacher, "progressive", "cpu").target_network is None
    assert du.Distillation.of("consistency").target_decay == 0.95


def test_the_distiller_tunes_towards_its_target_network(teacher):
    distiller = du.distiller_from(teacher, "consistency", "cpu", seed=2)
    x0, _ = next(distiller.batches())  # the teacher is unconditional
    generator_state = distiller.generator.get_state()

    def loss() -> float:
        distiller.generator.set_state(generator_state)
        with torch.no_grad():
            return float(distiller.objective_loss(x0, None))

    before = loss()
    with torch.no_grad():
        for parameter in distiller.target_network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert loss() != pytest.approx(before, rel=1e-3)


def test_a_consistency_checkpoint_without_target_decay_resumes_with_the_student_as_its_target(teacher, tmp_path):
    """A checkpoint whose distillation record has no target_decay (written before the field existed) resumes as it
    was tuned: no target network, the student its own target."""
    distiller = du.distiller_from(teacher, "consistency", "cpu", target_decay=None)
    distiller.train(steps=1, progress=False)
    path = du.save_checkpoint(tmp_path / "old.pt", distiller)
    payload = torch.load(path, weights_only=True)
    del payload["distillation"]["target_decay"]
    torch.save(payload, path)
    resumed = du.load_trainer(path, "cpu")
    assert resumed.distillation.target_decay is None and resumed.target_network is None
    resumed.train(steps=1, progress=False)
    assert resumed.step == 2


def test_the_consistency_target_comes_from_the_target_network():
    """With a target network, the loss is || f_student(x_t, t) - f_target(x_r, r) ||^2: built here by hand."""
    student, other, teacher = tiny_unet(1), tiny_unet(2), tiny_unet(3)
    x0, grid = shapes(), 4
    losses = []
    for target_network in (None, other):  # without gradients: only the values are compared
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            losses.append(
                du.consistency_loss(student, teacher, SCHEDULE, "v", x0, grid, generator, None, target_network)
            )
    generator = torch.Generator().manual_seed(5)
    points = du.trailing_grid(SCHEDULE, grid)
    k = torch.randint(0, len(points), (len(x0),), generator=generator)
    t, r = points[k], torch.where(k > 0, points[(k - 1).clamp(min=0)], -1)
    x_t = SCHEDULE.noised(x0, torch.randn(x0.shape, generator=generator), t)
    target = du.consistency_target(other, teacher, SCHEDULE, "v", x_t, t, r)
    with torch.no_grad():
        by_hand = torch.nn.functional.mse_loss(du.network_x0(student, SCHEDULE, "v", x_t, t), target)
    assert float(losses[1]) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(losses[0]) != pytest.approx(float(losses[1]), rel=1e-3)


@pytest.mark.parametrize(("method", "decay"), [("progressive", 0.9), ("consistency", 1.0), ("consistency", -0.1)])
def test_a_target_decay_outside_a_consistency_ema_is_refused(method, decay):
    with pytest.raises(ValueError, match="target_decay is a consistency target's EMA decay"):
        du.Distillation.of(method, target_decay=decay)


def test_reflow_tunes_a_flow_and_refuses_a_diffusion_model(flow_teacher, teacher):
    distiller = du.distiller_from(flow_teacher, "reflow", "cpu")
    distiller.train(steps=2, progress=False)
    assert len(distiller.losses) == 2 and all(np.isfinite(distiller.losses))
    with pytest.raises(ValueError, match="reflow straightens a flow"):
        du.distiller_from(teacher, "reflow", "cpu")


def test_a_conditional_student_keeps_its_requests_and_guidance(tmp_path):
    trainer = du.Trainer(tiny_model_config(conditional=True), tiny_train_config(), device="cpu")
    trainer.train(steps=1, progress=False)
    base = du.save_checkpoint(tmp_path / "base.pt", trainer)
    distiller = du.distiller_from(base, "consistency", "cpu")
    distiller.train(steps=2, progress=False)
    asked = du.request(3, "circle", 20)
    plain = du.sample(
        distiller.sampling_model, distiller.schedule, 3, 2, "consistency", condition=asked, progress=False
    )
    guided = du.sample(
        distiller.sampling_model, distiller.schedule, 3, 2, "consistency", condition=asked, guidance=3.0, progress=False
    )
    assert not torch.equal(plain.images, guided.images)


# --- checkpoints and the command line ----------------------------------------------------------------------------


def test_distill_records_its_method_and_sample_uses_its_sampler(teacher, tmp_path, capsys):
    fast = tmp_path / "fast.pt"
    status, out, err = run_main(
        capsys,
        "distill",
        "--checkpoint",
        str(teacher),
        "--steps",
        "2",
        "--out",
        str(fast),
        "--no-progress",
        "--method",
        "progressive",
    )
    assert status == 0 and err == "" and "progressive" in out
    record = du.read_checkpoint(fast)["distillation"]
    assert record["method"] == "progressive" and record["sampler"] == "ddim" and record["spacing"] == "time-trailing"
    assert du.checkpoint_sampling(fast) == {"sampler": "ddim", "steps": record["steps"], "spacing": "time-trailing"}
    assert du.checkpoint_sampling(teacher) == {
        "sampler": du.DEFAULT_SAMPLER,
        "steps": du.DEFAULT_STEPS,
        "spacing": None,
    }
    samples = tmp_path / "s.npy"
    assert (
        run_main(capsys, "sample", "--checkpoint", str(fast), "--n", "2", "--out", str(samples), "--no-progress")[0]
        == 0
    )
    model, schedule = du.load_model(fast)
    expected = du.sample(model, schedule, 2, record["steps"], "ddim", spacing="time-trailing", progress=False)
    assert np.array_equal(np.load(samples), du.model_to_uint8(expected.images))
    assert (
        run_main(
            capsys,
            "sample",
            "--checkpoint",
            str(fast),
            "--n",
            "2",
            "--out",
            str(samples),
            "--no-progress",
            "--steps",
            "4",
        )[0]
        == 0
    )
    four = du.sample(model, schedule, 2, 4, "ddim", spacing="time-trailing", progress=False)
    assert np.array_equal(np.load(samples), du.model_to_uint8(four.images))


def test_distill_resumes_its_own_plan(teacher, tmp_path, capsys):
    fast = tmp_path / "fast.pt"
    common = ["--out", str(fast), "--no-progress"]
    assert run_main(capsys, "distill", "--checkpoint", str(teacher), "--steps", "1", *common)[0] == 0
    status, out, _ = run_main(capsys, "distill", "--resume", str(fast), "--steps", "1", *common)
    assert status == 0 and "resuming the consistency run" in out
    assert du.load_trainer(fast).step == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--minutes", "-1"], "minutes must be > 0"),
        (["--minutes", "0"], "minutes must be > 0"),
        ([], "give a training budget"),
        (["--steps", "2", "--method", "reflow"], "reflow straightens a flow"),
        (["--steps", "2", "--method", "magic"], "invalid choice"),
    ],
)
def test_distill_with_bad_input_writes_nothing(teacher, tmp_path, capsys, args, fragment):
    out = tmp_path / "fast.pt"
    status, _, err = run_main(
        capsys, "distill", "--checkpoint", str(teacher), "--out", str(out), "--no-progress", *args
    )
    assert_one_line_error(status, err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_distilling_a_distilled_model_or_another_kind_of_file_is_refused(teacher, tmp_path, capsys):
    fast = tmp_path / "fast.pt"
    assert (
        run_main(capsys, "distill", "--checkpoint", str(teacher), "--steps", "1", "--out", str(fast), "--no-progress")[
            0
        ]
        == 0
    )
    again = tmp_path / "again.pt"
    status, _, err = run_main(capsys, "distill", "--checkpoint", str(fast), "--steps", "1", "--out", str(again))
    assert_one_line_error(status, err, "already distilled (consistency)")
    samples = tmp_path / "s.npy"
    np.save(samples, np.zeros((2, 64, 64), np.uint8))
    status, _, err = run_main(capsys, "distill", "--checkpoint", str(samples), "--steps", "1", "--out", str(again))
    assert_one_line_error(status, err, "not a readable checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    status, _, err = run_main(capsys, "distill", "--checkpoint", str(other), "--steps", "1", "--out", str(again))
    assert_one_line_error(status, err, "not a diffusion_patterns checkpoint")
    status, _, err = run_main(capsys, "distill", "--resume", str(teacher), "--steps", "1", "--out", str(again))
    assert_one_line_error(status, err, "not a distillation run")
    status, _, err = run_main(capsys, "distill", "--checkpoint", str(teacher), "--steps", "1", "--out", str(teacher))
    assert_one_line_error(status, err, "would overwrite the teacher")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.pt", "other.pt", "s.npy"]
