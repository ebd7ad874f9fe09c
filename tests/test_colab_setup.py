"""The notebook's Colab setup cell, run with `exec` in a temporary folder, with a fake `google.colab` where needed.

The cell is found by the assignment of `REPO_URL`, the single setting that gives both the "Open In Colab" badge and the
address the cell clones on Colab. Each test substitutes its own `REPO_URL` in the source. Addresses that are cloned are
local git repositories (or paths that do not exist) under tmp_path, so nothing here touches the network.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import IPython.display
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "diffusion_patterns.ipynb"
REAL_RUN = subprocess.run
GITHUB_URL = "https://github.com/owner/diffusion_patterns"
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB_LINK = "https://colab.research.google.com/github/owner/diffusion_patterns/blob/main/diffusion_patterns.ipynb"
UPLOADED = b"# the copy the user uploaded\n"
CLONED = b"# the copy in the cloned repository\n"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def assigns_repo_url(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "REPO_URL" for t in statement.targets
    )


@cache
def setup_cells() -> list[tuple[int, str]]:
    """(index among code cells, source) of every code cell that assigns REPO_URL at top level."""
    code = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    return [
        (k, source)
        for k, source in enumerate(code)
        if "REPO_URL" in source and any(map(assigns_repo_url, ast.parse(source).body))
    ]


def setup_source() -> str:
    (_, source), *others = setup_cells()
    assert not others, "REPO_URL must be assigned in one cell only"
    return source


def with_repo_url(source: str, url: str) -> str:
    """The cell's source with the value of its `REPO_URL = ...` replaced by the literal `url`."""
    (statement,) = [s for s in ast.parse(source).body if assigns_repo_url(s)]
    value = statement.value
    assert value.lineno == value.end_lineno, "REPO_URL's value should fit on one line"
    lines = source.splitlines(keepends=True)
    line = lines[value.lineno - 1].encode()  # ast offsets count UTF-8 bytes
    lines[value.lineno - 1] = (line[: value.col_offset] + repr(url).encode() + line[value.end_col_offset :]).decode()
    return "".join(lines)


def make_origin(path: Path, files: dict[str, bytes]) -> Path:
    """A local git repository at path with one commit holding files: a reachable address for `git clone`."""
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "."], [*identity, "commit", "-q", "-m", "dummy"]):
        REAL_RUN(["git", "-C", str(path), *command], check=True, capture_output=True)
    return path


@dataclass
class FakeFiles:
    """Stands in for google.colab.files: upload() returns `response` ({filename: bytes}) like the real dialog."""

    response: dict[str, bytes] = field(default_factory=dict)
    calls: int = 0

    def upload(self) -> dict[str, bytes]:
        self.calls += 1
        return dict(self.response)


@dataclass
class Sandbox:
    work: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
    files: FakeFiles = field(default_factory=FakeFiles)
    commands: list[list[str]] = field(default_factory=list)
    shown: list[object] = field(default_factory=list)

    def on_colab(self, upload: dict[str, bytes] | None = None) -> None:
        """Put a fake `google.colab` (and `google`) package in sys.modules; monkeypatch takes it out again."""
        self.files.response = upload or {}
        google = types.ModuleType("google")
        colab = types.ModuleType("google.colab")
        google.__path__, colab.__path__ = [], []
        colab.files = self.files
        google.colab = colab
        self.monkeypatch.setitem(sys.modules, "google", google)
        self.monkeypatch.setitem(sys.modules, "google.colab", colab)

    def run(self, url: str) -> list[str]:
        """Execute the setup cell with REPO_URL = url; returns the lines it printed (and checks it wrote no stderr)."""
        self.capsys.readouterr()
        exec(compile(with_repo_url(setup_source(), url), "<colab setup cell>", "exec"), {"__name__": "__main__"})
        out, err = self.capsys.readouterr()
        assert err == ""
        return out.splitlines()

    def listing(self) -> list[str]:
        return sorted(str(p.relative_to(self.work)) for p in self.work.rglob("*") if ".git" not in p.parts)


@pytest.fixture
def sandbox(tmp_path, monkeypatch, capsys) -> Sandbox:
    """An empty working folder standing for Colab's /content, with every side effect of the cell recorded and undone."""
    work = tmp_path / "content"
    work.mkdir()
    box = Sandbox(work, monkeypatch, capsys)
    monkeypatch.chdir(work)
    monkeypatch.setenv("LC_ALL", "C")  # git's messages, quoted in the printed line, in English
    # Only what the cell adds makes the folder importable: no "" entry standing for the current folder.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **_: box.shown.extend(objects))

    def recording_run(args, *rest, **kwargs):
        command = [str(a) for a in args]
        assert not any("://" in a for a in command), f"a test tried to reach the network: {command}"
        box.commands.append(command)
        return REAL_RUN(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    return box


def finds_in_cwd(module: str) -> bool:
    """Whether `import module` would now load it from the current folder (the first sys.path entry that has it)."""
    spec = importlib.machinery.PathFinder.find_spec(module)
    return spec is not None and Path(spec.origin) == Path.cwd() / f"{module}.py"


# ------------------------------------------------------------------------------------------
# The committed cells
# ------------------------------------------------------------------------------------------


def test_setup_is_the_first_code_cell_and_imports_only_the_standard_library():
    ((index, source),) = setup_cells()
    assert index == 0, "the Colab setup must be the first code cell"
    assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), (
        "no magics: it must run as plain Python"
    )
    assert "pip install" not in source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    others = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert others <= {"IPython.display", "google.colab"}, f"the setup cell imports {sorted(others)}"


def test_the_address_lives_only_in_repo_url():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (statement,) = [s for s in ast.parse(setup_source()).body if assigns_repo_url(s)]
    url = ast.literal_eval(statement.value)
    assert isinstance(url, str) and (url == "" or url.startswith("https://github.com/")), url
    assert "your-name" not in nbformat.writes(notebook), "a placeholder address is left in the notebook"
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            assert "colab.research.google.com/github/" not in cell.source, "a hard-coded Colab link duplicates REPO_URL"
    assert "REPO_URL" in notebook.cells[0].source, "the first markdown cell should say where the badge comes from"


# ------------------------------------------------------------------------------------------
# The branches of the cell
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", GITHUB_URL])
@pytest.mark.parametrize("present", [True, False], ids=["file-present", "file-missing"])
def test_off_colab_it_fetches_and_writes_nothing_and_makes_the_folder_importable(sandbox, url, present):
    if present:
        (sandbox.work / "diffusion_utils.py").write_bytes(CLONED)
    before = sandbox.listing()
    lines = sandbox.run(url)
    assert lines == ["Setup: not on Colab, nothing fetched; diffusion_utils.py is imported from the current folder."]
    assert sandbox.commands == [] and sandbox.listing() == before
    assert "google.colab" not in sys.modules, "the cell must not import google.colab off Colab"
    assert Path.cwd() == sandbox.work and os.getcwd() in sys.path
    assert finds_in_cwd("diffusion_utils") == present


@pytest.mark.parametrize("url", ["", "missing-origin"])
def test_on_colab_with_the_file_already_there_it_fetches_nothing(sandbox, url):
    (sandbox.work / "diffusion_utils.py").write_bytes(CLONED)
    sandbox.on_colab(upload={"diffusion_utils.py": UPLOADED})
    lines = sandbox.run(str(sandbox.work.parent / url) if url else "")
    assert lines == [f"Colab setup: diffusion_utils.py is already in {sandbox.work}, nothing fetched."]
    assert sandbox.commands == [] and sandbox.files.calls == 0
    assert sandbox.listing() == ["diffusion_utils.py"] and (sandbox.work / "diffusion_utils.py").read_bytes() == CLONED
    assert Path.cwd() == sandbox.work and finds_in_cwd("diffusion_utils")


@needs_git
@pytest.mark.parametrize("origin_name", ["diffusion_patterns", "diffusion_patterns.git"])
def test_on_colab_it_clones_a_reachable_address_and_moves_into_the_clone(sandbox, tmp_path, origin_name):
    origin = make_origin(tmp_path / "remote" / origin_name, {"diffusion_utils.py": CLONED, "README.md": b"dummy\n"})
    sandbox.on_colab(upload={"diffusion_utils.py": UPLOADED})
    lines = sandbox.run(str(origin))
    clone = sandbox.work / "diffusion_patterns"
    assert lines == [f"Colab setup: cloned {origin} into diffusion_patterns/ and moved there."]
    assert [command[:2] for command in sandbox.commands] == [["git", "clone"]] and sandbox.files.calls == 0
    assert Path.cwd() == clone and (clone / "diffusion_utils.py").read_bytes() == CLONED
    assert not (sandbox.work / "diffusion_utils.py").exists()
    assert os.getcwd() in sys.path and finds_in_cwd("diffusion_utils")


@needs_git
def test_on_colab_after_a_restart_it_moves_into_the_earlier_clone_without_cloning_again(sandbox, tmp_path):
    origin = make_origin(tmp_path / "remote" / "diffusion_patterns", {"diffusion_utils.py": CLONED})
    sandbox.on_colab()
    sandbox.run(str(origin))
    os.chdir(sandbox.work)  # a restarted runtime starts again in /content
    lines = sandbox.run(str(origin))
    assert lines == [f"Colab setup: moved into diffusion_patterns/, cloned earlier from {origin}."]
    assert len(sandbox.commands) == 1 and sandbox.files.calls == 0
    assert Path.cwd() == sandbox.work / "diffusion_patterns" and finds_in_cwd("diffusion_utils")


def test_on_colab_without_an_address_it_asks_for_the_file_and_writes_the_upload(sandbox):
    sandbox.on_colab(upload={"diffusion_utils.py": UPLOADED})
    lines = sandbox.run("")
    assert lines == [f"Colab setup: REPO_URL is unset, so diffusion_utils.py was uploaded ({len(UPLOADED)} bytes)."]
    assert sandbox.commands == [] and sandbox.files.calls == 1
    assert (
        sandbox.listing() == ["diffusion_utils.py"] and (sandbox.work / "diffusion_utils.py").read_bytes() == UPLOADED
    )
    assert Path.cwd() == sandbox.work and finds_in_cwd("diffusion_utils")


@needs_git
@pytest.mark.parametrize("failure", ["missing-path", "no-git", "repository-without-the-file"])
def test_on_colab_an_unreachable_address_falls_back_to_the_upload(sandbox, tmp_path, failure):
    origin = tmp_path / "remote" / "diffusion_patterns"
    if failure == "repository-without-the-file":
        make_origin(origin, {"README.md": b"not this project\n"})
    if failure == "no-git":
        (tmp_path / "empty-bin").mkdir()
        sandbox.monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    sandbox.on_colab(upload={"diffusion_utils.py": UPLOADED})
    lines = sandbox.run(str(origin))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Colab setup: could not clone {origin} (")
    assert lines[0].endswith(f"), so diffusion_utils.py was uploaded ({len(UPLOADED)} bytes).")
    reason = {
        "missing-path": "does not exist",
        "no-git": "No such file",
        "repository-without-the-file": "no diffusion_utils.py",
    }
    assert reason[failure] in lines[0]
    assert [command[:2] for command in sandbox.commands] == [["git", "clone"]] and sandbox.files.calls == 1
    assert Path.cwd() == sandbox.work and (sandbox.work / "diffusion_utils.py").read_bytes() == UPLOADED
    assert finds_in_cwd("diffusion_utils")


@pytest.mark.parametrize(
    ("upload", "got"),
    [
        ({"diffusion_utils (1).py": UPLOADED}, "['diffusion_utils (1).py']"),
        ({"notes.txt": b"x", "model.pt": b"y"}, "['model.pt', 'notes.txt']"),
        ({}, "nothing"),
    ],
    ids=["renamed-copy", "other-files", "cancelled"],
)
def test_on_colab_an_upload_of_anything_else_is_refused_in_one_line(sandbox, upload, got):
    sandbox.on_colab(upload=upload)
    lines = sandbox.run("")
    assert lines == [
        f"Colab setup: REPO_URL is unset; got {got}, not diffusion_utils.py: rerun this cell to upload that file."
    ]
    assert sandbox.files.calls == 1 and sandbox.listing() == [], "nothing may be written under the wrong name"
    assert Path.cwd() == sandbox.work


@pytest.mark.parametrize(
    "url",
    ["", GITHUB_URL, GITHUB_URL + "/", GITHUB_URL + ".git", "git@github.com:owner/diffusion_patterns.git"],
)
@pytest.mark.parametrize("where", ["off-colab", "colab-with-file"])
def test_the_badge_is_shown_exactly_when_repo_url_is_set(sandbox, url, where):
    if where == "colab-with-file":
        (sandbox.work / "diffusion_utils.py").write_bytes(CLONED)
        sandbox.on_colab()
    lines = sandbox.run(url)
    assert len(lines) == 1 and sandbox.commands == [] and sandbox.files.calls == 0
    if not url:
        assert sandbox.shown == []
        return
    (badge,) = sandbox.shown
    assert isinstance(badge, IPython.display.Markdown)
    assert badge.data == f"[![Open In Colab]({BADGE_SVG})]({COLAB_LINK})"
