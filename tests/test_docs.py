"""README.md and docs/*.md point at things that exist.

Every relative link resolves to a file or folder of the repository (and its `#anchor` to a
heading, where it points into a Markdown file); every command in the code blocks names a real
make target, script, `teacher` subcommand or module. A failure names the file and line.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from teacher.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# code blocks whose lines are shell commands (```text, ```yaml, ```python, ... are not)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
# commands outside the project that the pages may show as they are
ALLOWED = {
    "cd",
    "git",
    "pip",
    "curl",
    "source",
    "export",
    "dvc",  # DVC's own command line; the params it sets are tested by the pipeline tests
    "huggingface-cli",
    "torchrun",  # the distributed launcher; tests/inference/test_labeling.py runs its `-m stages.label`
    "label-studio",
    ".venv-ls/bin/label-studio",
}
PYTHONS = {"python", "python3", ".venv/bin/python"}
TEACHERS = {"teacher", ".venv/bin/teacher"}

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MAKE_RULE = re.compile(r"^([A-Za-z0-9][\w.-]*(?:[ \t]+[A-Za-z0-9][\w.-]*)*)[ \t]*:(?!=)")


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    text: str
    block: str | None  # the info string of the fenced block holding it; None outside blocks


def page_lines(page: Path) -> list[Line]:
    """Every line of a Markdown page, each with the code block it sits in."""
    lines, block, fence = [], None, ""
    for number, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(text)
        if block is None and match:
            block, fence = match.group(2).lower(), match.group(1)
            lines.append(Line(number, text, None))
        elif block is not None and text.strip().startswith(fence[0] * len(fence)):
            block = None
            lines.append(Line(number, text, None))
        else:
            lines.append(Line(number, text, block))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in page_lines(page):
        match = HEADING.match(line.text) if line.block is None else None
        if match:
            base = slug(match.group(2))
            count = counts.get(base, 0)
            found.add(f"{base}-{count}" if count else base)
            counts[base] = count + 1
    return frozenset(found)


def link_problem(page: Path, target: str) -> str | None:
    """What is wrong with one link target of ``page``; None when it resolves."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
        return None
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.is_relative_to(ROOT):
        return f"{target} leaves the repository"
    if not resolved.exists():
        return f"{target}: no such file or folder ({resolved.relative_to(ROOT)})"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: {resolved.relative_to(ROOT)} has no heading with anchor #{anchor}"
    return None


@cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for text in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = MAKE_RULE.match(text)
        if match:
            targets.update(match.group(1).split())
    return frozenset(targets)


@cache
def teacher_subcommands() -> frozenset[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return frozenset(action.choices)
    raise AssertionError("teacher.cli.build_parser() has no subcommands")


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package that does not exist
        return False


def commands(page: Path) -> list[tuple[Line, list[str]]]:
    """The command lines of a page's shell code blocks, as words.

    Comments (whole lines and trailing ``# ...``) and the continuation lines of a command ending
    in a backslash are left out; leading ``NAME=value`` assignments are dropped.
    """
    found, continued = [], False
    for line in page_lines(page):
        if line.block not in SHELL_BLOCKS:
            continued = False
            continue
        text = line.text.strip()
        is_continuation, continued = continued, text.endswith("\\")
        if is_continuation or not text or text.startswith("#"):
            continue
        try:
            words = shlex.split(text.rstrip("\\"), comments=True)
        except ValueError as e:  # an unclosed quote: not a command line
            words = [f"<{e}>"]
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words:
            found.append((line, words))
    return found


def arguments(words: list[str]) -> list[str]:
    """The words after the command that are not options."""
    return [word for word in words[1:] if not word.startswith("-")]


def command_problem(words: list[str]) -> str | None:
    """What is wrong with one command; None when it names something real."""
    program = words[0]
    if program in ALLOWED:
        return None
    if program == "make":
        missing = [t for t in arguments(words) if "=" not in t and t not in make_targets()]
        return f"make target(s) {missing} not in the Makefile" if missing else None
    if program in TEACHERS:
        subcommand = next(iter(arguments(words)), None)
        if subcommand not in teacher_subcommands():
            return (
                f"`teacher {subcommand}` is not a subcommand of teacher.cli "
                f"({', '.join(sorted(teacher_subcommands()))})"
            )
        return None
    if program in PYTHONS:
        if "-m" in words:
            module = words[words.index("-m") + 1]
            return None if module_exists(module) else f"python -m {module}: no such module"
        if "-c" in words:
            return None
        script = next(iter(arguments(words)), None)
        if script is None or not (ROOT / script).is_file():
            return f"python {script}: no such file"
        return None
    return f"`{program}` is neither a project command nor allowlisted in tests/test_docs.py"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for line in page_lines(page):
        if line.block is not None:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line.text)):
            problem = link_problem(page, target)
            if problem:
                problems.append(f"{page_id(page)}:{line.number}: {problem}")
    assert not problems, "links that do not resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_name_real_things(page: Path) -> None:
    problems = []
    for line, words in commands(page):
        problem = command_problem(words)
        if problem:
            problems.append(f"{page_id(page)}:{line.number}: {line.text.strip()}\n    {problem}")
    assert not problems, "commands that name nothing real:\n" + "\n".join(problems)


def test_readme_shows_the_main_commands() -> None:
    """The ten-minute guide keeps the commands a newcomer needs (and the test sees them)."""
    shown = {" ".join(words) for _, words in commands(ROOT / "README.md")}
    for expected in ("make demo", "make run", "make test", "dvc metrics diff"):
        assert any(s.startswith(expected) for s in shown), f"README.md shows no `{expected}`"
    teacher = {words[1] for _, words in commands(ROOT / "README.md") if words[0] in TEACHERS}
    assert {"predict", "export", "serve"} <= teacher, teacher


def test_the_checker_catches_what_it_should() -> None:
    """The rules themselves, on made-up commands and links."""
    assert command_problem(["make", "no-such-target"]) is not None
    assert command_problem(["make", "test"]) is None
    assert command_problem([".venv/bin/teacher", "no-such-subcommand"]) is not None
    assert command_problem([".venv/bin/python", "scripts/no_such_script.py"]) is not None
    assert command_problem(["python", "-m", "teacher.no_such_module"]) is not None
    assert command_problem(["python", "-m", "teacher.cli"]) is None
    assert command_problem(["rm", "-rf", "/"]) is not None
    readme = ROOT / "README.md"
    assert link_problem(readme, "docs/NO_SUCH_PAGE.md") is not None
    assert link_problem(readme, "docs/CONTRACTS.md#no-such-heading") is not None
    assert link_problem(readme, "https://example.org/x") is None
    assert slug("Fine-tuning: base, LoRA, full (`benchmarks/bench_finetune.py`)") == (
        "fine-tuning-base-lora-full-benchmarksbench_finetunepy"
    )
