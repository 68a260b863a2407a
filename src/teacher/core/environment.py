"""Is the installed environment the committed lock, and does the lock keep pyproject's bounds?

`make` runs `python -m teacher.core.environment LOCK [--venv DIR]` after every install and before any
command: a package whose installed version differs from the lock is named in one line, instead
of a test failing later with a traceback. Standard library plus `packaging` (in every lock).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?\s*$")


@dataclass(frozen=True)
class Pin:
    """One `name==version ; marker` line of a lock."""

    name: str  # normalised (PEP 503)
    version: str
    marker: str | None  # None: every platform

    def applies(self) -> bool:
        """Whether this interpreter and platform install the pin."""
        return self.marker is None or Marker(self.marker).evaluate()


def normalise(name: str) -> str:
    """PEP 503 name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> list[Pin]:
    """The pins of a requirements lock (as `uv pip compile` writes it); hashes and comments skipped."""
    pins = []
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name, version, marker = match.groups()
            pins.append(Pin(normalise(name), version, marker.strip() if marker else None))
    if not pins:
        raise ValueError(f"{path}: no `name==version` lines; regenerate it with `make lock`")
    return pins


def installed_versions(venv: Path | None = None) -> dict[str, str]:
    """Normalised name -> version of what is installed: in this interpreter, or in `venv`."""
    paths = [str(p) for p in sorted(venv.glob("lib/python*/site-packages"))] if venv else None
    if venv is not None and not paths:
        raise ValueError(f"{venv} holds no lib/python*/site-packages: is it a virtual environment?")
    found = metadata.distributions(path=paths) if paths else metadata.distributions()
    return {normalise(d.metadata["Name"]): d.version for d in found if d.metadata["Name"]}


def lock_mismatches(pins: Iterable[Pin], installed: Mapping[str, str]) -> list[str]:
    """One line per pin that applies here and is missing or at another version."""
    problems = []
    for pin in pins:
        if not pin.applies():
            continue
        have = installed.get(pin.name)
        if have is None:
            problems.append(f"{pin.name} is not installed (the lock says {pin.version})")
        elif have != pin.version:
            problems.append(f"{pin.name} is {have} but the lock says {pin.version}")
    return problems


def bound_violations(requirements: Iterable[str], pins: Iterable[Pin]) -> list[str]:
    """Each pyproject requirement whose locked version falls outside its bounds."""
    locked = {pin.name: pin.version for pin in pins}
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = locked.get(normalise(req.name))
        if version is None:
            problems.append(f"{req.name}: required by pyproject.toml but not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: locked {version} is outside `{req}`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="requirements lock, e.g. requirements/main.txt")
    parser.add_argument("--venv", type=Path, help="check this venv instead of this interpreter's")
    args = parser.parse_args(argv)
    where = args.venv or Path(sys.prefix)
    problems = lock_mismatches(read_lock(args.lock), installed_versions(args.venv))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(
            f"{where}: {problems[0]}{more}, in {args.lock}: run the make command again, it"
            " reinstalls from the lock",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
