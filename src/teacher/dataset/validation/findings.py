"""What the checks found while they run: ids and a few details per rule (``Findings``), and
the ``record_key`` every id is stored under."""

from __future__ import annotations

from collections import Counter
from typing import Any

from teacher.dataset.validation.registry import RULES

MAX_DETAILS = 20  # per finding: the first details (what changed); ids are always complete


class Findings:
    """Accumulates ids (and a few details) per rule while the checks run."""

    def __init__(self) -> None:
        self.ids: dict[str, list[Any]] = {}
        self.details: dict[str, list[str]] = {}
        # dropped images / categories: record_key(id) -> the error rule that dropped it
        self.dropped: dict[str, dict[Any, str]] = {"images": {}, "categories": {}}
        self.removed: Counter = Counter()  # error rule -> annotations it removed, knock-on included
        self.box_and_mask = 0  # annotations with both a usable box and a mask

    def add(self, rule: str, record_id: Any, detail: str | None = None) -> None:
        assert rule in RULES, rule
        self.ids.setdefault(rule, []).append(record_id)
        if RULES[rule].severity == "error" and RULES[rule].record == "annotation":
            self.removed[rule] += 1
        if detail is not None and len(self.details.setdefault(rule, [])) < MAX_DETAILS:
            self.details[rule].append(detail)

    def count(self, severity: str) -> int:
        return sum(len(v) for k, v in self.ids.items() if RULES[k].severity == severity)

    def to_list(self, *, on_error: str) -> list[dict[str, Any]]:
        """Findings in rule order (errors, fixes, warnings as declared)."""
        out = []
        for name, rule in RULES.items():
            if name not in self.ids:
                continue
            fix = rule.fix
            if rule.severity == "error" and on_error != "drop":
                fix = f"none applied (on_error={on_error}); with on_error=drop: {rule.fix}"
            out.append(
                {
                    "rule": name,
                    "severity": rule.severity,
                    "record": rule.record,
                    "count": len(self.ids[name]),
                    "ids": self.ids[name],
                    "message": rule.message,
                    "fix": fix,
                    "details": self.details.get(name, []),
                }
            )
        return out


def record_key(value: Any) -> Any:
    """``value`` usable in a set or dict (lists and dicts as their repr)."""
    return value if isinstance(value, (int, float, str, type(None))) else repr(value)
