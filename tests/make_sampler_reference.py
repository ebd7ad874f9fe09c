"""Write tests/data/sampler_reference.npz: DPM-Solver++(2M) and DDIM trajectories computed by Hugging Face diffusers.

What: for our schedule (du.cosine_betas(1000)), our parameterisation (the network predicts v) and our clipping of
x0_hat to [-1, 1] before every step, this script runs diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M),
Lu et al. 2022, arXiv 2211.01095) and DDIMScheduler (eta = 0) on a small batch with a deterministic fake model,
and records, for every network evaluation, the model output v that was fed to diffusers and diffusers' sample after
the step. Everything runs in float64.

Why: an oracle that no one here wrote, for testing our own samplers at ~1e-10. diffusers stays out of the runtime
and test requirements: this script runs once, by hand; the tests only read the .npz (plain arrays,
np.load(path, allow_pickle=False) works). It is not a test: pytest does not collect it (its name does not start
with test_) and no test imports it.

How to run (in a separate virtual environment, so diffusers never enters the project's own; diffusion_utils needs
opencv at import, and is used here for du.cosine_betas only):
    python3 -m venv /tmp/venv-diffusers && . /tmp/venv-diffusers/bin/activate
    pip install torch==2.13.0   # or another CPU build; pin it below so pip keeps it
    pip install -r benchmarks/requirements-diffusers.txt "opencv-python>=4.8" "torch==2.13.0"
    python tests/make_sampler_reference.py             # writes tests/data/sampler_reference.npz
It takes a few seconds. Checked with diffusers 0.42.1, torch 2.13.0 (CPU), numpy 2.4.6.

Fixture layout. `betas` (1000,) float64; `diffusers_version`, `torch_version` (0-d str arrays); `case_names` (str);
and for each case NAME = f"{sampler}_{grid}_{K}", sampler in {dpm++, ddim}, grid in {time, logsnr}, K in {5, 10}:
    NAME_timesteps (K,) int64    descending training timesteps of the K network evaluations
    NAME_x_T       (2, 1, 8, 8)  the starting sample at timesteps[0] (seeded float64 normal, the same for all cases)
    NAME_outputs   (K, 2, 1, 8, 8)  v fed to diffusers at step k (at timesteps[k], sample x_T or x_after[k - 1])
    NAME_x0_hat    (K, 2, 1, 8, 8)  diffusers' clipped data prediction at step k
    NAME_x_after   (K, 2, 1, 8, 8)  diffusers' sample after step k: at timesteps[k + 1], and for k = K - 1 at
                                     alpha_bar = 1 (the clean image; the last step is first order)
Grids: "time" = np.linspace(0, 999, K).round() reversed; "logsnr" = the training timesteps nearest to K values of
lambda = log(sqrt(ab) / sqrt(1 - ab)) uniform from lambda(999) to lambda(0), picked in turn from strictly smaller
timesteps (so no duplicates: the clipped last beta makes lambda(999) an outlier, and K = 10 would otherwise pick 999
twice). Both end at t = 0. The fake model (fake_v) has an x0 target 1.5 tanh(fixed pattern + t-dependent wave + 0.3 x)
that goes outside [-1, 1], so clipping matters, and moves with t and x, so DPM-Solver++'s history matters and the
end point depends on the whole trajectory.

Precision: diffusers builds its tables in float32 (trained_betas is cast to float32), and its DPM step() casts the
sample to float32. We fix both, touching only what step() reads:
  DPMSolverMultistepScheduler: after construction, betas, alphas, alphas_cumprod, alpha_t, sigma_t, lambda_t and
    sigmas are replaced by float64 values from our betas (set_timesteps reads alphas_cumprod; the rest is for
    consistency); set_timesteps(timesteps=[...]) (custom timesteps are supported in 0.42.1) then rebuilds `sigmas`
    in float32, so we overwrite `sigmas` again with float64 sqrt((1 - ab) / ab) at the grid, then 0
    (final_sigmas_type="zero"); step() derives alpha_t, sigma_t and lambda from `sigmas` alone. Its line
    `sample = sample.to(torch.float32)` is made a no-op by handing step() the sample as a _Float64Sample.
  DDIMScheduler (0.42.1) has no custom timesteps, and its step() goes from t to t - num_train_timesteps //
    num_inference_steps, a fixed stride that matches neither grid (not even its own "linspace" grid). So its
    `alphas_cumprod` becomes a float64 table indexed by grid position (entry i = ab at the i-th smallest grid
    timestep), `num_inference_steps` = num_train_timesteps (stride 1), `timesteps` = K - 1, ..., 0, and
    `final_alpha_cumprod` = 1.0 in float64; step(timestep=i) then goes from grid position i to i - 1, and from
    position 0 to alpha_bar = 1. Its step() has no float32 cast. The timestep it is given is that grid position;
    the fixture stores the training timesteps.
check_threshold_is_clip() confirms that the thresholding configured above is a plain clip to [-1, 1], and
check_by_hand() recomputes every trajectory from the recorded outputs with an independent numpy implementation of
the DPM-Solver++(2M) data-prediction update and of DDIM, and fails above 1e-10. With diffusers 0.42.1 they agree to
2e-15 in every case; without these overwrites diffusers' own float32 arithmetic is off by up to 5e-4 (float32
tables) or 4e-7 (float64 tables, but the float32 cast of the sample).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, for diffusion_utils

import diffusion_utils as du  # noqa: E402

try:
    import diffusers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
except ImportError:  # the module docstring says how to install it
    diffusers = None

T = 1000
SHAPE = (2, 1, 8, 8)
KS = (5, 10)
GRIDS = ("time", "logsnr")
SAMPLERS = ("dpm++", "ddim")
TOLERANCE = 1e-10
DEFAULT_OUT = ROOT / "tests" / "data" / "sampler_reference.npz"


# ------------------------------------------------------------------------------------------
# Schedule, grids and the fake model (numpy, float64)
# ------------------------------------------------------------------------------------------


def alpha_bar(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def log_snr(ab: np.ndarray) -> np.ndarray:
    return 0.5 * (np.log(ab) - np.log1p(-ab))


def time_grid(k: int) -> np.ndarray:
    return np.linspace(0, T - 1, k).round()[::-1].astype(np.int64)


def logsnr_grid(ab: np.ndarray, k: int) -> np.ndarray:
    """Nearest training timesteps to k log-SNRs uniform in [lambda(T-1), lambda(0)], strictly descending."""
    lam = log_snr(ab)
    chosen, upper = [], T
    for i, target in enumerate(np.linspace(lam[-1], lam[0], k)):
        candidates = np.arange(k - 1 - i, upper)  # leave room for the timesteps still to pick
        upper = int(candidates[np.argmin(np.abs(lam[candidates] - target))])
        chosen.append(upper)
    return np.array(chosen, dtype=np.int64)


def make_grid(name: str, ab: np.ndarray, k: int) -> np.ndarray:
    grid = time_grid(k) if name == "time" else logsnr_grid(ab, k)
    assert grid[0] == T - 1 and grid[-1] == 0 and np.all(np.diff(grid) < 0), grid
    return grid


def make_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x_T and the fake model's two fixed patterns, from one seeded float64 normal generator."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), 1.2 * rng.standard_normal(SHAPE), rng.uniform(0, 2 * np.pi, SHAPE)


def fake_v(x: np.ndarray, ab_t: float, t: int, pattern: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """v whose implied x0 is x0_target = 1.5 tanh(pattern + 0.4 sin(phase + 2 pi t / 700) + 0.3 x), exactly.

    The target moves with t (so DPM-Solver++'s history matters) and with the sample x (so the end point depends on
    the whole trajectory, as with a real denoiser), and about half its values lie outside [-1, 1].
    """
    x0_target = 1.5 * np.tanh(pattern + 0.4 * np.sin(phase + 2 * np.pi * t / 700) + 0.3 * x)
    eps_hat = (x - np.sqrt(ab_t) * x0_target) / np.sqrt(1 - ab_t)
    return np.sqrt(ab_t) * eps_hat - np.sqrt(1 - ab_t) * x0_target


# ------------------------------------------------------------------------------------------
# diffusers, in float64
# ------------------------------------------------------------------------------------------


class _Float64Sample(torch.Tensor):
    """A tensor whose .to(torch.float32) returns itself: keeps DPMSolverMultistepScheduler.step() in float64.

    step() has `sample = sample.to(torch.float32)` ("upcast", which for float64 is a downcast); nothing else in
    the solver changes. `intercepted` counts the casts skipped.
    """

    intercepted = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and (torch.float32 in args[1:] or kwargs.get("dtype") is torch.float32):
            cls.intercepted += 1
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def f64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def dpm_scheduler(betas: np.ndarray, grid: np.ndarray) -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) with our settings, its tables replaced by float64 ones (see the module docstring)."""
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas,
        prediction_type="v_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        thresholding=True,  # dynamic thresholding with s clamped to [1, sample_max_value] = [1, 1]: a plain clip
        sample_max_value=1.0,
    )
    ab = alpha_bar(betas)
    sched.betas, sched.alphas, sched.alphas_cumprod = f64(betas), f64(1 - betas), f64(ab)
    sched.alpha_t, sched.sigma_t, sched.lambda_t = f64(np.sqrt(ab)), f64(np.sqrt(1 - ab)), f64(log_snr(ab))
    sched.sigmas = f64(np.sqrt((1 - ab) / ab))
    sched.set_timesteps(timesteps=grid.tolist())
    assert sched.timesteps.tolist() == grid.tolist(), sched.timesteps
    sched.sigmas = f64(np.append(np.sqrt((1 - ab[grid]) / ab[grid]), 0.0))
    return sched


def ddim_scheduler(betas: np.ndarray, grid: np.ndarray) -> DDIMScheduler:
    """DDIM (eta = 0 in step) on a float64 alphas_cumprod indexed by grid position (see the module docstring)."""
    sched = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=betas,
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        thresholding=False,
    )
    sched.set_timesteps(len(grid))
    sched.alphas_cumprod = f64(alpha_bar(betas)[grid[::-1]])
    sched.final_alpha_cumprod = f64(1.0)
    sched.num_inference_steps = sched.config.num_train_timesteps  # stride 1, in grid positions
    sched.timesteps = torch.arange(len(grid) - 1, -1, -1)
    return sched


def check_threshold_is_clip(sched: DPMSolverMultistepScheduler) -> None:
    x = f64(np.linspace(-3, 3, 2 * 64).reshape(2, 1, 8, 8))
    assert torch.equal(sched._threshold_sample(x), x.clamp(-1, 1)), "thresholding is not a plain clip"


def run_dpm(betas, grid, x_T, model) -> dict[str, np.ndarray]:
    sched = dpm_scheduler(betas, grid)
    check_threshold_is_clip(sched)
    x, outputs, x0_hats, xs = f64(x_T), [], [], []
    for t in grid:
        v = f64(model(x.numpy(), alpha_bar(betas)[t], int(t)))
        x = sched.step(v, int(t), x.as_subclass(_Float64Sample)).prev_sample.as_subclass(torch.Tensor)
        assert x.dtype == torch.float64
        outputs.append(v.numpy())
        x0_hats.append(sched.model_outputs[-1].as_subclass(torch.Tensor).numpy())
        xs.append(x.numpy())
    return {"outputs": np.stack(outputs), "x0_hat": np.stack(x0_hats), "x_after": np.stack(xs)}


def run_ddim(betas, grid, x_T, model) -> dict[str, np.ndarray]:
    sched = ddim_scheduler(betas, grid)
    x, outputs, x0_hats, xs = f64(x_T), [], [], []
    for position, t in zip(sched.timesteps.tolist(), grid):
        v = f64(model(x.numpy(), alpha_bar(betas)[t], int(t)))
        out = sched.step(v, position, x, eta=0.0, use_clipped_model_output=True)
        x = out.prev_sample
        assert x.dtype == torch.float64
        outputs.append(v.numpy())
        x0_hats.append(out.pred_original_sample.numpy())
        xs.append(x.numpy())
    return {"outputs": np.stack(outputs), "x0_hat": np.stack(x0_hats), "x_after": np.stack(xs)}


# ------------------------------------------------------------------------------------------
# Independent hand computation (numpy, float64), from the recorded outputs
# ------------------------------------------------------------------------------------------


def grid_alpha_sigma(betas: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha = sqrt(ab), sigma = sqrt(1 - ab) at the K grid timesteps, then at ab = 1 (alpha 1, sigma 0)."""
    ab = np.append(alpha_bar(betas)[grid], 1.0)
    return np.sqrt(ab), np.sqrt(1 - ab)


def hand_dpm(betas, grid, x_T, outputs) -> np.ndarray:
    """DPM-Solver++(2M), midpoint, data prediction; first order at the first and the last (to sigma = 0) step."""
    alpha, sigma = grid_alpha_sigma(betas, grid)
    lam = np.log(alpha[:-1]) - np.log(sigma[:-1])
    x, d_prev, xs = x_T, None, []
    for i, v in enumerate(outputs):
        d0 = np.clip(alpha[i] * x - sigma[i] * v, -1, 1)
        if i == len(grid) - 1:
            x = d0  # sigma_t = 0: (sigma_t / sigma_s) x - alpha_t (exp(-inf) - 1) D0 = D0
        else:
            h = lam[i + 1] - lam[i]
            d = d0 if i == 0 else d0 + 0.5 * (d0 - d_prev) / ((lam[i] - lam[i - 1]) / h)
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * np.expm1(-h) * d
        d_prev = d0
        xs.append(x)
    return np.stack(xs)


def hand_ddim(betas, grid, x_T, outputs) -> np.ndarray:
    """DDIM eta = 0 with x0 clipped and eps re-derived from the clipped x0."""
    alpha, sigma = grid_alpha_sigma(betas, grid)
    x, xs = x_T, []
    for i, v in enumerate(outputs):
        x0 = np.clip(alpha[i] * x - sigma[i] * v, -1, 1)
        x = alpha[i + 1] * x0 + sigma[i + 1] * (x - alpha[i] * x0) / sigma[i]
        xs.append(x)
    return np.stack(xs)


def check_by_hand(betas: np.ndarray, cases: dict[str, dict[str, np.ndarray]]) -> float:
    worst = 0.0
    for name, case in cases.items():
        hand = hand_dpm if name.startswith("dpm++") else hand_ddim
        diff = float(np.abs(hand(betas, case["timesteps"], case["x_T"], case["outputs"]) - case["x_after"]).max())
        print(f"{name:16s} max |diffusers - hand| = {diff:.2e}   max |x| = {np.abs(case['x_after']).max():.2f}")
        worst = max(worst, diff)
    if worst > TOLERANCE:
        raise SystemExit(f"diffusers and the hand computation differ by {worst:.2e} > {TOLERANCE:.0e}")
    return worst


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def build_cases(betas: np.ndarray, seed: int) -> dict[str, dict[str, np.ndarray]]:
    x_T, pattern, phase = make_inputs(seed)

    def model(x, ab_t, t):
        return fake_v(x, ab_t, t, pattern, phase)

    cases = {}
    for sampler in SAMPLERS:
        for grid_name in GRIDS:
            for k in KS:
                grid = make_grid(grid_name, alpha_bar(betas), k)
                run = run_dpm if sampler == "dpm++" else run_ddim
                cases[f"{sampler}_{grid_name}_{k}"] = {"timesteps": grid, "x_T": x_T, **run(betas, grid, x_T, model)}
    return cases


def save(path: Path, betas: np.ndarray, cases: dict[str, dict[str, np.ndarray]]) -> None:
    arrays = {
        "betas": betas,
        "diffusers_version": np.array(diffusers.__version__),
        "torch_version": np.array(torch.__version__),
        "case_names": np.array(list(cases)),
    }
    for name, case in cases.items():
        arrays.update({f"{name}_{key}": value for key, value in case.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB, {len(arrays)} arrays)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz")
    parser.add_argument("--seed", type=int, default=0, help="seed for x_T and the fake model's patterns")
    args = parser.parse_args(argv)
    if diffusers is None:
        raise SystemExit("needs diffusers; see the module docstring for a separate virtual environment")
    torch.set_num_threads(1)
    betas = du.cosine_betas(T).numpy()
    cases = build_cases(betas, args.seed)
    skipped = _Float64Sample.intercepted
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}; float32 casts skipped: {skipped}")
    worst = check_by_hand(betas, cases)
    print(f"all cases match the hand computation to {worst:.2e}")
    save(args.out, betas, cases)


if __name__ == "__main__":
    main()
