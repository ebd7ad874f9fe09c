"""The module reads top to bottom: no numbered section calls ahead into a later one (the appendices A-C aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import diffusion_utils as du

SOURCE = Path(du.__file__).read_text()
SECTION = re.compile(r"^# (\d+|[A-Z])\. ", re.M)


def sections(source: str = SOURCE) -> list[tuple[int, str]]:
    """(first line, section label) of every section header, in order."""
    return [(source.count("\n", 0, m.start()) + 1, m.group(1)) for m in SECTION.finditer(source)]


def section_of(line: int, headers: list[tuple[int, str]]) -> str:
    label = "0"  # the imports and constants before section 1
    for first, name in headers:
        if first <= line:
            label = name
    return label


def rank(label: str) -> float:
    return float(label) if label.isdigit() else 100.0  # appendices come after every numbered section


def names_used(node: ast.AST) -> set[str]:
    """Names the code of a definition evaluates, leaving out annotations (they are never run: postponed)."""
    used: set[str] = set()

    def visit(item: ast.AST) -> None:
        if isinstance(item, ast.Name):
            used.add(item.id)
        for field, value in ast.iter_fields(item):
            if field in ("annotation", "returns"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child)

    visit(node)
    return used


def forward_references(source: str = SOURCE) -> list[str]:
    tree = ast.parse(source)
    headers = sections(source)
    defined: dict[str, str] = {}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = [
                t.id
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            ]
        for name in targets:
            defined.setdefault(name, section_of(node.lineno, headers))
    found = []
    for node in tree.body:
        here = section_of(node.lineno, headers)
        if rank(here) >= 100:
            continue
        for name in sorted(names_used(node)):
            there = defined.get(name)
            if there is not None and rank(there) < 100 and rank(there) > rank(here):
                found.append(f"section {here} (line {node.lineno}) uses {name} of section {there}")
    return found


def test_the_sections_are_numbered_in_order():
    labels = [label for _, label in sections()]
    numbered = [int(label) for label in labels if label.isdigit()]
    assert numbered == list(range(1, len(numbered) + 1)) and labels[len(numbered) :] == ["A", "B", "C"]


def test_no_numbered_section_calls_ahead_into_a_later_one():
    assert forward_references() == []


def test_a_call_ahead_is_found_and_an_annotation_or_an_appendix_is_not():
    source = (
        "# 1. One\ndef a(x: Later) -> Later:\n    return helper(x)\n"
        "# 2. Two\ndef b():\n    return later()\n"
        "# 3. Three\nclass Later:\n    pass\ndef later():\n    return b()\n"
        "# A. Appendix\ndef helper(x):\n    return later()\n"
    )
    assert forward_references(source) == ["section 2 (line 5) uses later of section 3"]
