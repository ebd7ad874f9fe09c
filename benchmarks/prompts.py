"""Prompts read by cross-attention (issue 25): does a model obey words, in phrasings it never saw too?

A prompt model draws --samples images per prompt set with its default sampler and guidance (du.checkpoint_sampling,
du.DEFAULT_PROMPT_GUIDANCE), all from the same noise, scored word by word (du.evaluate_prompts): "seen"
(du.seen_prompts, the training templates with every part given) and "held-out" (du.held_out_prompts: the same shapes
described in word orders training never shows); then "empty", the empty prompt (the unconditional model), scored as
every other benchmark scores unconditional samples (du.evaluate_samples). Figures: prompts_grid.png (varied prompts,
a row each; green: obeys every word) and attention_maps.png (which pixels read which word, Hertz et al. 2022).
--speed: ms per training step, request model against prompt model and five variants, alternating. Writes
prompts.json/.md.

RESULTS.md, "Prompts", gives the commands of its tables (a prompt model trains 15 minutes on the 2-core CPU).
Smoke test (seconds; trains a tiny prompt model on the spot):
    python benchmarks/prompts.py --train-steps 3 --samples 4 --steps 3 --threads 1 --out /tmp/bench_smoke/prompts
    python benchmarks/prompts.py --train-steps 1 --samples 2 --steps 2 --speed --speed-steps 2 --speed-repeats 2 \\
        --speed-warmup 1 --threads 1 --out /tmp/bench_smoke/prompts_speed
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import sys

import _common as bc  # benchmarks/ is on sys.path as this script's folder; it puts the repo root there too

import diffusion_utils as du

NAME = "prompts"
DATA_SEED = 8642  # the shapes that the "seen" and "held-out" prompts describe (the same shapes for both)
GRID_SAMPLES = 6  # samples per prompt in prompts_grid.png
HELD_OUT_STARTS = {  # each of du.HELD_OUT_TEMPLATES by how its prompts begin (the first that matches)
    "held-out: a 25 px square, place": r"a \d",
    "held-out: a square, place, size": r"a ",
    "held-out: place, the square, size word": r"",
}
assert len(HELD_OUT_STARTS) == len(du.HELD_OUT_TEMPLATES)
LEAN = {"text_layers": 1, "cross_attention_levels": 0}  # the cheapest prompt network measured
SPEED_CONFIGS = {  # name: the changes to du.default_configs(device, "flow")'s model (conditional)
    "request": {"conditioning": "request"},
    "prompt": {"conditioning": "prompt", "attention_heads": 2},  # the recipe (asserted in speed_rows)
    "prompt, 4 heads": {"conditioning": "prompt"},
    "prompt, 1 head": {"conditioning": "prompt", "attention_heads": 1},
    "prompt, 4 heads, every level": {"conditioning": "prompt", "cross_attention_levels": None},
    "prompt, 4 heads, learned positions": {"conditioning": "prompt", "text_positions": "learned"},
    "prompt, 4 heads, 1 text layer, bottleneck only": {"conditioning": "prompt", **LEAN},
}
SAMPLING = "set; n; sampler; steps; guidance||g"
PROMPT_COLUMNS = bc.columns(
    SAMPLING,
    "valid||.3f; matches||.3f; class_accuracy|class|.3f; size_word_accuracy|size word|.3f",
    "size_error|size error (px)|.2f; half_accuracy|half|.3f; quadrant_accuracy|quadrant|.3f",
    "centre_accuracy|centre|.3f; center_error|place error (px)|.2f; sample_seconds|seconds|.1f",
)
EMPTY_COLUMNS = bc.columns(
    SAMPLING,
    "valid||.3f; mid_gray|mid-gray|.3f; circle_share||.3f; size_w1|size W1 (px)|.2f",
    "position_w1|position W1 (px)|.2f; sample_seconds|seconds|.1f",
)
SPEED_COLUMNS = bc.columns(
    "config; parameters||,; ms_per_step|ms / step (median)|.1f; ratio|against request|.2f",
    "data_ms|data ms / batch (median)|.1f; steps_timed",
)


def parse_args(argv: list[str] | None):
    parser = bc.make_parser(__doc__, f"runs/benchmarks/{NAME}")
    bc.add_model_source_args(parser, "a prompt model (train --conditioning prompt; du.load_model: EMA weights)")
    parser.add_argument("--samples", type=bc.positive_int, default=256, help="images per prompt set (default 256)")
    parser.add_argument("--steps", type=bc.positive_int, help="network evaluations per image (default: the model's)")
    parser.add_argument("--guidance", type=float, default=du.DEFAULT_PROMPT_GUIDANCE, help="guidance scale (sample's)")
    speed = parser.add_argument_group("speed: ms per training step of the request and prompt models")
    speed.add_argument("--speed", action="store_true", help="also time training steps (off by default)")
    speed.add_argument("--speed-steps", type=bc.positive_int, default=10, help="timed steps per config and round")
    speed.add_argument("--speed-repeats", type=bc.positive_int, default=5, help="rounds, alternating configs (5)")
    speed.add_argument("--speed-warmup", type=int, default=3, help="untimed steps per config first (3)")
    return parser.parse_args(argv)


def load_or_train(args, device) -> tuple[du.UNet, du.NoiseSchedule, str, dict]:
    """The checkpoint's sampling model and how it samples by default, or (smoke tests) a tiny prompt model."""
    if args.checkpoint:
        model, schedule = du.load_model(args.checkpoint, device=device)
        source = f"{du.describe_model(model)}; checkpoint {args.checkpoint}"
        return model, schedule, source, du.checkpoint_sampling(args.checkpoint)
    flow, flow_train = du.default_configs("cpu", "flow", "prompt")
    config = dataclasses.replace(flow, base_channels=8, text_width=16, text_layers=1)
    train = dataclasses.replace(flow_train, batch_size=8, channels_last=False, seed=args.seed)
    trainer = du.Trainer(config, train, device=device)
    trainer.train(steps=args.train_steps, progress=False)
    sampling = {"sampler": du.DEFAULT_SAMPLER, "steps": du.DEFAULT_STEPS, "spacing": None}
    source = f"tiny prompt model trained for {trainer.step} steps (smoke)"
    return trainer.sampling_model.eval(), trainer.schedule, source, sampling


def prompt_rows(model, schedule, name: str, texts: list[str], sampling: dict, device) -> list[dict]:
    """One prompt set, sampled from the fixed seed and scored word by word; the held-out set also per template."""
    options = {"prompt": texts, "seed": bc.SAMPLE_SEED, "progress": False, **sampling}
    result, seconds = bc.timed(lambda: du.sample(model, schedule, len(texts), **options), device)
    row = {"set": name, "sampler": sampling["sampler"], "steps": sampling["steps"], "guidance": sampling["guidance"]}
    rows = [row | du.evaluate_prompts(result.images, texts) | {"sample_seconds": seconds}]
    print(f"{name}: valid {rows[0]['valid']:.3f}, matches {rows[0]['matches']:.3f}", flush=True)
    if name != "held-out":  # only the held-out set is split by template
        return rows
    templates = [next(t for t, start in HELD_OUT_STARTS.items() if re.match(start, text)) for text in texts]
    for template in HELD_OUT_STARTS:
        mine = [k for k, of in enumerate(templates) if of == template]
        rows.append(row | {"set": template} | du.evaluate_prompts(result.images[mine], [texts[k] for k in mine]))
    return rows


def empty_row(model, schedule, args, sampling: dict, device) -> dict:
    """The empty prompt: the unconditional model, scored as the other benchmarks score unconditional samples."""
    sampler, steps, spacing = sampling["sampler"], sampling["steps"], sampling["spacing"]
    scores, _ = bc.sample_and_evaluate(model, schedule, args.samples, sampler, steps, device, spacing=spacing)
    print(f"empty: valid {scores['valid']:.3f}, mid-gray {scores['mid_gray']:.3f}", flush=True)
    return {"set": "empty", "guidance": None, **scores}  # nothing to guide towards


def plot_prompt_grid(model, schedule, sampling: dict):
    """du.EXAMPLE_PROMPTS, a row of GRID_SAMPLES samples each (du.plot_prompt_grid)."""
    prompts, held_out = zip(*du.EXAMPLE_PROMPTS)
    texts = [text for text in prompts for _ in range(GRID_SAMPLES)]
    images = du.sample(
        model, schedule, len(texts), prompt=texts, seed=bc.SAMPLE_SEED, progress=False, **sampling
    ).images
    how = f"{sampling['sampler']}, {sampling['steps']} steps, guidance {sampling['guidance']:g}"
    return du.plot_prompt_grid(images, prompts, held_out, how)


def plot_attention(model, schedule, sampling: dict):
    """A sample per du.ATTENTION_WORDS entry and the maps of its words (du.plot_word_attention)."""
    texts = list(du.ATTENTION_WORDS)
    images = du.sample(
        model, schedule, len(texts), prompt=texts, seed=bc.SAMPLE_SEED, progress=False, **sampling
    ).images
    return du.plot_word_attention(model, schedule, images, du.ATTENTION_WORDS, bc.SAMPLE_SEED)


def speed_rows(args, device) -> list[dict]:
    """Median ms per training step (and per batch drawn) of each SPEED_CONFIGS model on the device's flow recipe:
    --speed-warmup untimed steps each, then --speed-repeats rounds of --speed-steps steps each, the configs in turn
    (a drift of the machine hits all alike). Each step and each batch is timed alone, the device synced around it."""
    base, train = du.default_configs(device, "flow")
    train = dataclasses.replace(train, seed=args.seed)
    assert dataclasses.replace(base, **SPEED_CONFIGS["prompt"]) == du.default_configs(device, "flow", "prompt")[0]
    trainers, streams = {}, {}
    for name, changes in SPEED_CONFIGS.items():
        trainers[name] = du.Trainer(dataclasses.replace(base, conditional=True, **changes), train, device=device)
        streams[name] = trainers[name].batches()  # what training draws (no workers on the CPU recipe)
        for _ in range(args.speed_warmup):
            bc.train_step(trainers[name], next(streams[name]))
    step_ms = {name: [] for name in SPEED_CONFIGS}
    data_ms = {name: [] for name in SPEED_CONFIGS}
    for round_ in range(args.speed_repeats):
        for name, trainer in trainers.items():
            for _ in range(args.speed_steps):
                batch, seconds = bc.timed(lambda name=name: next(streams[name]), device)
                data_ms[name].append(1e3 * seconds)
                _, seconds = bc.timed(lambda t=trainer, b=batch: bc.train_step(t, b), device)
                step_ms[name].append(1e3 * seconds)
        print(f"speed round {round_ + 1}/{args.speed_repeats} done", flush=True)
    reference = statistics.median(step_ms["request"])
    rows = []
    for name, trainer in trainers.items():
        ms = statistics.median(step_ms[name])
        row = {"config": name, "parameters": du.count_parameters(trainer.model), "ms_per_step": ms}
        row |= {"ratio": ms / reference, "data_ms": statistics.median(data_ms[name]), "steps_timed": len(step_ms[name])}
        rows.append(row | {"batch_size": train.batch_size})
        print(f"{name}: {ms:.1f} ms / step ({ms / reference:.2f}x the request model)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.setup(args)
    model, schedule, source, recorded = load_or_train(args, device)
    if not (model.config.conditional and model.config.conditioning == "prompt"):
        print(f"{args.checkpoint}: not a prompt model (train it with --conditioning prompt)", file=sys.stderr)
        return 2
    args.out, env = bc.prepare_out(args.out), bc.environment(device, __file__)
    print(f"{bc.environment_line(env)}\nmodel: {source}", flush=True)
    sampling = {**recorded, "guidance": args.guidance}
    if args.steps is not None:
        sampling["steps"] = args.steps
    sets = {"seen": du.seen_prompts(args.samples, DATA_SEED), "held-out": du.held_out_prompts(args.samples, DATA_SEED)}
    rows = [row for name, texts in sets.items() for row in prompt_rows(model, schedule, name, texts, sampling, device)]
    bc.save_json(args.out / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    rows.append(empty_row(model, schedule, args, sampling, device))
    bc.save_json(args.out / f"{NAME}.json", {"environment": env, "rows": rows, "partial": True})
    du.save_figure(plot_prompt_grid(model, schedule, sampling), args.out / f"{NAME}_grid.png", dpi=110)
    du.save_figure(plot_attention(model, schedule, sampling), args.out / "attention_maps.png", dpi=110)
    speed = speed_rows(args, device) if args.speed else []
    setting = f"{args.samples} images per set, sampling seed {bc.SAMPLE_SEED}; prompts of make_shapes(n, {DATA_SEED})"
    setting += f"\n\nnumber role share (0: x and y are one): {du.number_role_share(model.text_encoder):.3f}"
    sections = [f"model: {source}", "## Prompt sets", bc.markdown_table(rows[:-1], PROMPT_COLUMNS), setting]
    sections += ["## The empty prompt (unconditional)", bc.markdown_table(rows[-1:], EMPTY_COLUMNS)]
    if speed:
        rounds = f"{args.speed_repeats} alternating rounds of {args.speed_steps} steps per config"
        timing = f"flow recipe, batch {speed[0]['batch_size']}; {rounds}, after {args.speed_warmup} untimed"
        sections += ["## Training speed", bc.markdown_table(speed, SPEED_COLUMNS), timing]
    title = "Prompts read by cross-attention"
    bc.write_report(args.out, NAME, title, env, sections, model=model.config, sampling=sampling, rows=rows, speed=speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
