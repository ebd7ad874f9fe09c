"""Shared set-up for the test suite: headless matplotlib, one CPU thread, deterministic hypothesis."""

import os

# Before torch / matplotlib are imported anywhere: no windows, and one thread. The suite's models
# are tiny; on a busy 2-core machine several threads per process spin against each other and a
# training step gets ~20x slower. One thread also keeps every result bitwise reproducible.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_model_config, tiny_train_config  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import diffusion_utils as du  # noqa: E402

torch.set_num_threads(1)

# Same examples on every run (derandomize), no example database, no per-example deadline:
# the suite must be deterministic and must not fail because a shared machine was slow.
settings.register_profile(
    "suite",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("suite")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny Trainer after 3 steps (with EMA) and its checkpoint file; treat both as read-only."""
    trainer = du.Trainer(tiny_model_config(), tiny_train_config(), device="cpu")
    trainer.train(steps=3, progress=False)
    path = du.save_checkpoint(tmp_path_factory.mktemp("trained") / "tiny.pt", trainer)
    return trainer, path
