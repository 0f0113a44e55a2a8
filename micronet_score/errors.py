"""Errors that micronet-score reports to its user as one clear line (exit code 2 from the CLI)."""

from __future__ import annotations


class MicronetError(Exception):
    """A problem with the user's input (a file, a flag, a model) that the user can fix."""


class RuleError(MicronetError):
    """A rule file is missing, unreadable or invalid. The message names the file, the key and the problem."""

    def __init__(self, source: str, key: str | None, problem: str):
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"invalid rule set {where}: {problem}")


class CountingBug(MicronetError):
    """An internal inconsistency of the counting (a negative count): a bug to report, named by op and module."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
