"""Does any lever make SDEdit both realistic and faithful on the sketches? (RESULTS.md, "Editing".)

On --samples sketches (du.make_sketches, the data seed of benchmarks/editing.py): the sketches as drawn, the edit
repeated (strength 0.4 twice and three times, 0.5 twice, 0.3 three times), the deterministic sampler (DDIM at 0.5
and 0.6), and asking for the sketch's class with a request (0.5, 0.6, 0.8); scored against the intended shapes as
editing.py scores them. Prints one line per lever.
    python benchmarks/experiments/editing_levers.py --samples 128 --threads 1 --out benchmarks/results/editing/levers \\
        --checkpoint benchmarks/results/flow_vs_diffusion/runs_a/flow_seed0.pt
Smoke test (seconds): python benchmarks/experiments/editing_levers.py --train-steps 2 --samples 2 --steps 2 \\
    --threads 1 --out /tmp/editing_levers_smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common and editing

import _common as bc  # noqa: E402
import torch  # noqa: E402
from editing import DATA_SEED, against_intention  # noqa: E402

import diffusion_utils as du  # noqa: E402

# (label, strength, rounds, sampler, ask for the sketch's class)
LEVERS = [
    (f"{s:g} x{r}, {sampler}", s, r, sampler, False)
    for s, r, sampler in [
        (0.4, 2, "ddpm"),
        (0.4, 3, "ddpm"),
        (0.5, 2, "ddpm"),
        (0.3, 3, "ddpm"),
        (0.5, 1, "ddim"),
        (0.6, 1, "ddim"),
    ]
] + [(f"{s:g}, class asked", s, 1, "ddpm", True) for s in (0.5, 0.6, 0.8)]


def main(argv: list[str] | None = None) -> int:
    parser = bc.make_parser(__doc__, "runs/benchmarks/editing_levers")
    bc.add_model_source_args(parser, "a checkpoint")
    parser.add_argument("--samples", type=bc.positive_int, default=128)
    parser.add_argument("--steps", type=bc.positive_int, default=du.DEFAULT_STEPS)
    args = parser.parse_args(argv)
    device = bc.setup(args)
    model, schedule, _ = bc.load_or_train(args, device)
    sketches = du.make_sketches(args.samples, seed=DATA_SEED)
    asked = sketches.condition()
    nan = float("nan")
    class_only = asked.replace(centers=torch.full_like(asked.centers, nan), sizes=torch.full_like(asked.sizes, nan))
    rows = [{"lever": "as drawn", **against_intention(sketches.images, sketches)}]
    for label, strength, rounds, sampler, ask in LEVERS:
        images = sketches.images
        for k in range(rounds):
            options = {"steps": args.steps, "seed": bc.SAMPLE_SEED + k, "progress": False, "sampler": sampler}
            images = du.edit(model, schedule, images, strength, condition=class_only if ask else None, **options).images
        rows.append({"lever": label, **against_intention(images, sketches)})
        print(rows[-1], flush=True)
    bc.save_json(
        bc.prepare_out(args.out) / "editing_levers.json", {"environment": bc.environment(device), "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
