"""The teaching notebook: static checks, and a top-to-bottom run with a tiny configuration.

The run injects a cell right after the one tagged `parameters` (papermill-style, without papermill) that
shrinks the model, the training and the sampling, and points every output into pytest's tmp_path, so the
committed `backwards_process.png` and `runs/notebook/` are never touched.
"""

from __future__ import annotations

import ast
import base64
import os
import struct
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "diffusion_patterns.ipynb"
COMMITTED_FIGURE = REPO / "backwards_process.png"
DEFAULT_OUTPUT_DIR = REPO / "runs" / "notebook"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 300


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def parameters_indices(notebook: nbformat.NotebookNode) -> list[int]:
    return [k for k, cell in enumerate(notebook.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]


def as_python(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so `ast` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path} has no IHDR chunk"
    return struct.unpack(">II", head[16:24])


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Size, mtime (ns) and, for the committed figure, content of every file under path (or of path itself)."""
    if path.is_file():
        stat = path.stat()
        return {str(path): (stat.st_size, stat.st_mtime_ns, path.read_bytes())}
    if path.is_dir():
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, None) for p in sorted(path.rglob("*")) if p.is_file()}
    return {}


# ------------------------------------------------------------------------------------------
# Static checks (fast)
# ------------------------------------------------------------------------------------------


def test_notebook_is_valid_with_python3_kernel_and_no_widget_state():
    notebook = read_notebook()
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in notebook.metadata, "metadata.widgets breaks GitHub's notebook renderer; strip it"


def test_no_committed_output_is_a_stateless_progress_widget():
    """With widget state stripped, a tqdm widget output shows on GitHub as its frozen text: "0%|  | 0/900"."""
    stale = [
        output["data"].get("text/plain")
        for cell in code_cells(read_notebook())
        for output in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {})
    ]
    assert not stale, f"progress-bar widget outputs without their state: {stale}; drop them after executing"


def test_exactly_one_parameters_cell_of_literal_assignments():
    notebook = read_notebook()
    indices = parameters_indices(notebook)
    assert len(indices) == 1, f"expected exactly one cell tagged 'parameters', found {len(indices)}"
    cell = notebook.cells[indices[0]]
    assert cell.cell_type == "code"
    tree = ast.parse(cell.source)
    names = []
    for statement in tree.body:
        assert isinstance(statement, ast.Assign), (
            f"line {statement.lineno}: only plain assignments belong in the parameters cell"
        )
        assert len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name), (
            f"line {statement.lineno}: assign one name"
        )
        ast.literal_eval(statement.value)  # raises ValueError unless the value is a literal
        names.append(statement.targets[0].id)
    assert len(names) == len(set(names)), f"a parameter is assigned twice: {names}"
    expected = {
        "SEED",
        "TRAIN_MINUTES",
        "TRAIN_STEPS",
        "BATCH_SIZE",
        "SAMPLE_STEPS",
        "DDIM_STEPS",
        "N_SAMPLES",
        "N_EVAL",
        "OUTPUT_DIR",
        "FIGURE_PATH",
        "TINY_MODEL",
        "COMPARE_ORIGINAL",
        "RESUME",
    }
    assert expected <= set(names), f"missing parameters: {sorted(expected - set(names))}"


def test_code_cells_call_diffusion_utils_and_define_nothing():
    notebook = read_notebook()
    sources = [cell.source for cell in code_cells(notebook)]
    assert any("import diffusion_utils as du" in source for source in sources)
    for k, source in enumerate(sources):
        for line in source.splitlines():
            assert not line.startswith(("def ", "class ", "async def ")), (
                f"code cell {k} defines logic; move it to diffusion_utils.py: {line!r}"
            )
        for node in ast.walk(ast.parse(as_python(source))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
                f"code cell {k} defines {node.name}; move it to diffusion_utils.py"
            )


def test_colab_setup_only_runs_on_colab():
    setup = next(cell.source for cell in code_cells(read_notebook()) if "REPO_URL" in cell.source)
    assert '"google.colab" in sys.modules' in setup
    assert "pip install" not in setup, "Colab already has every dependency"


# ------------------------------------------------------------------------------------------
# Executing the notebook with a tiny configuration
# ------------------------------------------------------------------------------------------

FIGURES = (
    "dataset.png",
    "schedules.png",
    "forward_process.png",
    "time_embedding.png",
    "loss_weights.png",
    "training_snapshots.png",
    "loss.png",
    "loss_by_timestep.png",
    "samples.png",
    "samplers.png",
    "few_steps.png",
    "step_sweep.png",
    "interpolation.png",
    "implied_weights.png",
    "captions.png",
    "sketch_to_shape.png",
    "inpainting.png",
    "inversion.png",
)
CONDITIONAL_FIGURES = ("guidance_grid.png", "guidance.png")
PROMPT_FIGURES = ("prompts_grid.png", "attention_maps.png")  # the notebook's model reads prompts (CONDITIONING)


def tiny_parameters(output_dir: Path, figure_path: Path, **overrides: object) -> str:
    """The injected cell: a few training steps of a tiny U-Net, a few sampling steps, outputs in tmp_path."""
    values: dict[str, object] = {
        "TRAIN_STEPS": 3,
        "TRAIN_MINUTES": None,
        "BATCH_SIZE": 8,
        "TINY_MODEL": True,
        "N_SAMPLES": 8,
        "N_EVAL": 8,
        "SAMPLE_STEPS": 6,
        "DDIM_STEPS": 3,
        "FEW_STEPS": [2, 3],
        "GUIDANCE_SCALES": [0.0, 2.0],
        "N_GUIDANCE": 4,
        "N_EDIT": 8,
        "ORIGINAL_SAMPLE_STEPS": 6,
        "OUTPUT_DIR": str(output_dir),
        "FIGURE_PATH": str(figure_path),
        "COMPARE_ORIGINAL": False,
        "RESUME": None,
    }
    values.update(overrides)
    return "\n".join(
        ["# injected by tests/test_notebook.py"] + [f"{name} = {value!r}" for name, value in values.items()]
    )


def run_notebook(parameters: str) -> nbformat.NotebookNode:
    """Execute the notebook in a fresh kernel from the repository root, `parameters` injected after the tagged cell."""
    from nbclient import NotebookClient

    notebook = read_notebook()
    (index,) = parameters_indices(notebook)
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters, metadata={"tags": ["injected-parameters"]}))
    # One thread: the tiny model gains nothing from more, and OpenMP threads that spin-wait on a busy
    # machine made each forward pass ~10x slower. No bytecode written into the repository.
    env = dict(
        os.environ,
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on the first error
    errors = [
        (k, output.get("ename"), output.get("evalue"))
        for k, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors, f"error outputs: {errors}"
    assert all(cell.execution_count is not None for cell in code_cells(notebook)), "a code cell did not run"
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text or Markdown."""
    texts = []
    for cell in code_cells(notebook):
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(output.get("data", {}).get("text/markdown", ""))
    return "\n".join(texts)


@pytest.fixture
def protected_files():
    """Fails the test if the committed figure, the default OUTPUT_DIR or the notebook itself changed."""
    before = (snapshot(COMMITTED_FIGURE), snapshot(DEFAULT_OUTPUT_DIR), NOTEBOOK.read_bytes())
    yield
    assert snapshot(COMMITTED_FIGURE) == before[0], "the committed backwards_process.png changed"
    assert snapshot(DEFAULT_OUTPUT_DIR) == before[1], "the default OUTPUT_DIR (runs/notebook) was written to"
    assert NOTEBOOK.read_bytes() == before[2], "the committed notebook changed"


def test_notebook_runs_top_to_bottom_with_tiny_configuration(tmp_path, protected_files):
    output_dir, figure_path = tmp_path / "out", tmp_path / "figure" / "backwards_process.png"
    notebook = run_notebook(tiny_parameters(output_dir, figure_path))

    images = [
        output
        for cell in code_cells(notebook)
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    figures = FIGURES + (CONDITIONAL_FIGURES if du_default_is_conditional() else ()) + PROMPT_FIGURES
    assert len(images) >= len(figures) + 1, f"expected the figures inline, got {len(images)} PNG outputs"
    text = printed(notebook)
    assert "| real data |" in text and "| DDIM 3 steps |" in text, "the evaluation table is missing"
    assert "trained 3 steps" in text
    assert "| seen |" in text and "| held-out |" in text, "this run's prompt scores are missing"

    assert figure_path.is_file(), "FIGURE_PATH was not written"
    width, height = png_size(figure_path)
    assert 600 <= width <= 4000 and 300 <= height <= 4000, f"odd figure size {width}x{height}"
    assert 5_000 < figure_path.stat().st_size < 5_000_000
    shown = [base64.b64decode(output["data"]["image/png"]) for output in images]
    assert figure_path.read_bytes() in shown, "the figure shown is not the figure saved"
    gif = figure_path.with_suffix(".gif")
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a"), "the animation was not saved as a GIF beside the figure"
    assert any(
        "image/gif" in output.get("data", {}) for cell in code_cells(notebook) for output in cell.get("outputs", [])
    )
    assert (output_dir / "model.pt").is_file(), "the checkpoint was not written to OUTPUT_DIR"
    for name in figures:
        assert (output_dir / name).is_file(), f"{name} missing from OUTPUT_DIR"
        png_size(output_dir / name)
    written = set(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    expected = {f"out/{name}" for name in figures} | {
        "out/model.pt",
        "figure/backwards_process.png",
        "figure/backwards_process.gif",
    }
    assert written == expected, "unexpected files written"


def du_default_is_conditional() -> bool:
    import diffusion_utils as du

    return du.default_configs("cpu")[0].conditional


def test_notebook_resumes_and_compares_with_the_original_design(tmp_path, protected_files):
    import diffusion_utils as du

    tiny = du.ModelConfig(base_channels=8, channel_mults=(1, 2), blocks_per_level=1)
    trainer = du.Trainer(tiny, du.TrainConfig(batch_size=4, seed=1), device="cpu")
    trainer.train(steps=2, progress=False)
    checkpoint = du.save_checkpoint(tmp_path / "start.pt", trainer)

    output_dir, figure_path = tmp_path / "out", tmp_path / "backwards_process.png"
    notebook = run_notebook(
        tiny_parameters(output_dir, figure_path, TRAIN_STEPS=2, RESUME=str(checkpoint), COMPARE_ORIGINAL=True)
    )
    text = printed(notebook)
    assert f"resumed from {checkpoint} at step 2" in text
    assert "now at step 4" in text
    assert "| original design, DDPM 6 steps |" in text
    assert (output_dir / "original.pt").is_file() and (output_dir / "original_samples.png").is_file()
    assert du.load_trainer(output_dir / "model.pt").step == 4
    assert figure_path.is_file()


# ------------------------------------------------------------------------------------------
# The helpers the notebook added to diffusion_utils
# ------------------------------------------------------------------------------------------


def test_feature_shapes_follow_the_unet_levels():
    import diffusion_utils as du

    model = du.UNet(du.ModelConfig(base_channels=8, channel_mults=(1, 2, 2), pixel_unshuffle=2)).train()
    shapes = dict(du.feature_shapes(model))
    assert shapes["input"] == shapes["head (conv + pixel-shuffle)"] == (1, 64, 64)
    assert shapes["stem (pixel-unshuffle + conv)"] == (8, 32, 32)
    assert [shapes[f"encoder level {k}"] for k in range(3)] == [(8, 32, 32), (16, 16, 16), (16, 8, 8)]
    assert shapes["bottleneck"] == (16, 8, 8)
    assert [shapes[f"decoder level {k}"] for k in range(3)] == [(8, 32, 32), (16, 16, 16), (16, 8, 8)]
    assert model.training, "feature_shapes must leave the model's mode as it was"
    assert all(not module._forward_hooks for module in model.modules()), "hooks left behind"


def test_markdown_table_formats_cells():
    import diffusion_utils as du

    table = du.markdown_table(["name", "value"], [("a|b", 0.123456), ("c", float("nan")), ("d", 3)])
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a\\|b | 0.123 |", "| c | - |", "| d | 3 |"]
    with pytest.raises(ValueError, match="2 cells"):
        du.markdown_table(["name", "value"], [("only one",)])
