"""Where do the mid-gray pixels of the samples come from? An analysis of one trained checkpoint.

1. The network as a one-step denoiser (real shapes noised to t, its clipped x0_hat): gray here means it cannot draw
   a sharp edge; clean here but gray samples means the gray builds up along the sampling path.
2. Its own samples with several samplers and step counts. 3. Where their mid-gray pixels lie (edge band, class).
Why: mid-gray pixels are the quality bar short CPU budgets miss (RESULTS.md, "Where the mid-gray pixels come from").

Full run (about 3 minutes; failure_modes.py answers the same question's other half, with the same edge band):
    python benchmarks/experiments/mid_gray.py --checkpoint C --out DIR
Smoke test (seconds):
    python benchmarks/experiments/mid_gray.py --train-steps 3 --samples 8 --threads 1 --out /tmp/mid_gray_smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as bc  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_utils as du  # noqa: E402

TIMESTEPS = (0, 10, 20, 50, 100, 200, 300, 500)
SAMPLERS = (("ddpm", 100), ("ddpm", 50), ("ddpm", 10), ("ddim", 20), ("dpm++", 10), ("dpm++", 20))
DENOISING_COLUMNS = [("t", "t", ""), ("x0_hat mid-gray", "one-step x0_hat mid-gray", "%")]
DENOISING_COLUMNS += [("error", "mean |x0_hat - x0|", ".4f")]
SAMPLER_COLUMNS = bc.columns("sampler; valid||%; mid_gray|mid-gray|%; circle_share||.2f")


def parse_args(argv):
    parser = bc.make_parser(__doc__, "runs/benchmarks/mid_gray")
    bc.add_model_source_args(parser, "a trained checkpoint to analyse")
    parser.add_argument("--samples", type=int, default=256, help="images per measurement (default 256)")
    return parser.parse_args(argv)


def mid_gray(images: np.ndarray) -> float:
    return float(du.mid_gray_mask(images).mean())


@torch.no_grad()
def one_step_denoising(model, schedule, n: int) -> list[dict]:
    """Real shapes noised to each t in one go, then the network's clipped x0_hat."""
    device = next(model.parameters()).device
    x0 = du.make_shapes(n, seed=(7, 7)).images
    generator = torch.Generator().manual_seed(0)
    rows = []
    for t_value in TIMESTEPS:
        t = torch.full((n,), t_value)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        output = model(x_t.to(device), t.to(device)).float().cpu()
        x0_hat = schedule.predict_x0(model.config.prediction, x_t, output, t).clamp(-1, 1)
        error = float((x0_hat - x0).abs().mean())
        rows.append({"t": t_value, "x0_hat mid-gray": mid_gray(du.model_to_uint8(x0_hat)), "error": error})
    return rows


def samplers(model, schedule, n: int) -> tuple[list[dict], np.ndarray]:
    rows, first = [], None
    for name, steps in SAMPLERS:
        images = du.sample(model, schedule, n, steps=steps, sampler=name, seed=5, progress=False).images
        rows.append({"sampler": f"{name}-{steps}", **du.evaluate_samples(images)})
        first = du.model_to_uint8(images) if first is None else first
    return rows, first


def where(images: np.ndarray) -> dict:
    """Shares of mid-gray pixels by distance (px) to the band of edge pixels, and mid-gray per class read."""
    distances, by_class = np.zeros(4), {"circle": [], "square": [], "invalid": []}
    for image, edge in zip(images, bc.edge_band(images)):
        distance = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)
        distances += np.histogram(np.minimum(distance[du.mid_gray_mask(image)], 3), bins=4, range=(0, 4))[0]
        reading = du.read_shape(image)
        by_class[du.CLASS_NAMES[reading.label] if reading.valid else "invalid"].append(mid_gray(image))
    shares = distances / max(distances.sum(), 1)
    return {
        "by_distance": dict(zip(["0", "1", "2", "3+"], shares.tolist())),
        "by_class": {k: float(np.mean(v)) if v else None for k, v in by_class.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source = bc.load_or_train(args, device)
    denoising = one_step_denoising(model, schedule, args.samples)
    sampled, images = samplers(model, schedule, args.samples)
    located = where(images)
    text = "\n\n".join(
        [
            f"# Where the mid-gray pixels come from\n\n{bc.environment_line(bc.environment(device))}; {source}",
            bc.markdown_table(denoising, DENOISING_COLUMNS),
            bc.markdown_table(sampled, SAMPLER_COLUMNS),
            f"mid-gray pixels by distance to the edge band (px): {located['by_distance']}",
            f"mean mid-gray share by the class read: {located['by_class']}",
        ]
    )
    print(text)
    out = bc.prepare_out(args.out)
    (out / "mid_gray.md").write_text(text + "\n")
    bc.save_json(out / "mid_gray.json", {"denoising": denoising, "samplers": sampled, "where": located})
    return 0


if __name__ == "__main__":
    sys.exit(main())
