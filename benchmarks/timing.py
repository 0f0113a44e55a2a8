"""Ratios of counting time to forward time that hold on a loaded machine.

Each round runs the plain forward and every variant once, back to back, in a rotating order; a variant's ratio
in that round is its time over that round's forward time, and the reported ratio is the median over rounds.
Load that comes and goes (other processes) then moves both sides of a ratio together instead of skewing it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    forward: Callable[[], object], variants: dict[str, Callable[[], object]], rounds: int
) -> tuple[float, dict[str, float | None], dict[str, str]]:
    """(median forward seconds, {variant: median ratio to the forward, None if it failed}, {variant: error})."""
    errors: dict[str, str] = {}
    live = {}
    forward()  # warm up
    for key, fn in variants.items():
        try:
            fn()
            live[key] = fn
        except Exception as err:  # a peer that cannot handle this model: recorded, not fatal
            errors[key] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    ratios: dict[str, list[float]] = {key: [] for key in live}
    plain = []
    keys = list(live)
    for r in range(rounds):
        base = seconds(forward)
        plain.append(base)
        for key in keys[r % len(keys) :] + keys[: r % len(keys)] if keys else []:
            ratios[key].append(seconds(live[key]) / base)
    result: dict[str, float | None] = {key: None for key in variants}
    result.update({key: statistics.median(values) for key, values in ratios.items()})
    return statistics.median(plain), result, errors


def save_results(out: dict, path: str | Path) -> None:
    """``out`` with the machine's load, torch and the date, written as JSON to ``path`` and printed."""
    import torch

    out = {**out, "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
