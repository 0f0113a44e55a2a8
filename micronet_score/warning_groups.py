"""Warnings people read: the same finding on many tensors or modules becomes one line with a count and examples.

A warning names its subject first (``"audit: layers.0.fc.0.weight: fp32 values declared as 8 bits: ..."``). Two
warnings are the same finding when they differ only in that subject and in their numbers; such a group is
written as its first warning in full, then how many more subjects have it, with a few of their names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SUBJECT = re.compile(r"^(?P<prefix>(?:[a-z][\w -]*: )?)(?P<subject>[^\s:]+): (?P<rest>.+)$", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)
EXAMPLES = 3


@dataclass
class WarningGroup:
    """Warnings that report one finding: ``first`` in full, every subject (tensor or module) it names."""

    first: str
    subjects: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.messages)

    def line(self) -> str:
        """The group as one line: the first warning, then the count and a few names of the others."""
        if self.count == 1:
            return self.first
        others = self.subjects[1:]
        shown = ", ".join(others[:EXAMPLES]) + (f" and {len(others) - EXAMPLES:,} more" if len(others) > EXAMPLES
                                                 else "")
        return f"{self.first} [the same on {len(others):,} more: {shown}; --verbose lists all]"


def _key(warning: str) -> tuple[str, str] | None:
    match = _SUBJECT.match(warning)
    if match is None or "." not in match["subject"] and not match["prefix"]:
        return None  # no subject (a path-like name, or a name after a prefix such as "audit: ")
    return match["prefix"], _NUMBER.sub("#", match["rest"])


def group_warnings(warnings: list[str]) -> list[WarningGroup]:
    """Warnings grouped by finding, in the order each finding first appears."""
    groups: dict[object, WarningGroup] = {}
    for i, warning in enumerate(warnings):
        key = _key(warning) or i
        group = groups.setdefault(key, WarningGroup(first=warning))
        match = _SUBJECT.match(warning)
        group.subjects.append(match["subject"] if match else warning)
        group.messages.append(warning)
    return list(groups.values())


def warning_lines(warnings: list[str], verbose: bool = False) -> list[str]:
    """What to print: every warning with ``verbose``, else one line per finding."""
    return list(warnings) if verbose else [group.line() for group in group_warnings(warnings)]
