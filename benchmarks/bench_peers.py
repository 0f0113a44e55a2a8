"""Counting time / one plain forward, against peer counters; one thread, same process (issue 8).

Per model, each round runs the plain forward and every counter once, back to back in a rotating order; a
counter's ratio is the median over rounds of its time over that round's forward (see timing.py). Counters:

* ``measure``: micronet-score's ``Counter.measure`` around the forward (the training-loop API: the weight
  table is built once and refreshed only where tensors changed);
* ``count``: the one-shot ``micronet_score.count()`` (rules, weight table with every nonzero counted, the
  forward, the report);
* ``shape_only``: the one-shot ``count(..., shape_only=True)`` (the forward on a meta copy, priced with the real
  model's densities and widths; totals checked equal to ``count``'s);
* ``shape_only_warm``: ``Counter.count_shapes`` on a counter that has counted once (meta copy and nonzeros
  kept: the model's tensors did not change);
* ``fvcore``: fvcore's ``FlopCountAnalysis`` (a fresh analysis each time: it traces the model);
* ``flop_counter``: ``torch.utils.flop_counter.FlopCounterMode``.

Models: WRN-28-10 (1x3x32x32), MobileNetV2-1.4 (1x3x224x224), the JAIST QRNN (96 tokens, batch 1) and the MIT
transformer LM (its best configuration, random weights, 9-bit quantizers: one 96-token segment with full
memory and a full 3000-entry cache).

Run: .venv/bin/python benchmarks/bench_peers.py   (writes benchmarks/results/peers.json, prints a Markdown table)
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from micronet_score.models.mit_lm import example_tokens
from micronet_score.models.mobilenet_v2 import MobileNetV2
from micronet_score.models.registry import get
from micronet_score.models.wrn import WideResNet
from torch import nn

import micronet_score as ms

sys.path.insert(0, str(Path(__file__).parent))
from bench_mit_eval import build as build_full_size_mit_lm
from machine import cpu_name
from timing import interleaved

RESULTS = Path(__file__).parent / "results" / "peers.json"
KEYS = ["measure", "count", "shape_only", "shape_only_warm", "fvcore", "flop_counter"]


def fvcore_total(model: nn.Module, inputs: tuple) -> float:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return float(analysis.total())


def flop_counter_total(model: nn.Module, inputs: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        model(*inputs)
    return float(mode.get_total_flops())


def totals(report: ms.Report) -> dict[str, float]:
    return {k: getattr(report, k) for k in ("mults", "adds", "others", "params", "flops")}


def bench(name: str, model: nn.Module, inputs: tuple, rounds: int, options: dict[str, Any] | None = None) -> dict:
    options = options or {}
    counter = ms.Counter(model, **options)
    warm = ms.Counter(model, **options)

    def measured() -> None:
        with counter.measure():
            model(*inputs)

    def shapes_warm() -> None:
        warm.count_shapes(*inputs)

    variants: dict[str, Callable[[], object]] = {
        "measure": measured,
        "count": lambda: ms.count(model, *inputs, **options),
        "shape_only": lambda: ms.count(model, *inputs, shape_only=True, **options),
        "shape_only_warm": shapes_warm,
        "fvcore": lambda: fvcore_total(model, inputs),
        "flop_counter": lambda: flop_counter_total(model, inputs),
    }
    row: dict[str, Any] = {"model": name, "rounds": rounds}
    with torch.no_grad():
        forward, ratios, errors = interleaved(lambda: model(*inputs), variants, rounds)
        row["forward_ms"] = forward * 1e3
        row["ratios"] = ratios
        row["errors"] = errors
        real = totals(ms.count(model, *inputs, **options))
        row["totals"] = real
        if "shape_only" not in errors:
            row["shape_only_identical_totals"] = totals(ms.count(model, *inputs, shape_only=True, **options)) == real
    return row


def wrn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return WideResNet(28, 10).eval(), (torch.randn(1, 3, 32, 32),)


def mobilenet() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return MobileNetV2(1.4).eval(), (torch.randn(1, 3, 224, 224),)


def qrnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    spec = get("jaist-qrnn")
    model = spec.build(spec.default_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model, (torch.randint(0, 267_735, (96, 1)),)


def mit() -> tuple[nn.Module, tuple, dict]:
    """The best configuration with random weights; the state after 32 segments of 96 tokens: every layer's
    memory full (96 positions) and the cache full (3000 entries), then one 96-token segment to time."""
    model = build_full_size_mit_lm()
    n = model.config.n_seq
    tokens = example_tokens(model.config, n * 33 + 1, seed=0)
    with torch.no_grad():
        state = model.new_stream()
        for i in range(0, n * 32, n):
            _, state = model(tokens[i : i + n], tokens[i + 1 : i + n + 1], state)
    assert all(m.filled == model.config.n_seq for m in state.memory)
    assert int((state.cache.values >= 0).sum()) == model.config.n_cache
    inputs = (tokens[n * 32 : n * 33], tokens[n * 32 + 1 : n * 33 + 1], state)
    return model, inputs, {"bits": model.config.bits}


def cell(row: dict, key: str) -> str:
    value = row["ratios"].get(key)
    return "fails" if value is None else f"{value:.2f}x"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | forward ms | Counter.measure | count() | shape-only count() | shape-only warm | fvcore "
        "| FlopCounterMode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['forward_ms']:.1f} | " + " | ".join(cell(row, k) for k in KEYS) + " |")
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for key, error in row["errors"].items():
            out.append(f"- {row['model']}: {key} fails: {error}")
        if "shape_only_identical_totals" in row:
            same = "identical to" if row["shape_only_identical_totals"] else "DIFFERENT from"
            out.append(f"- {row['model']}: shape-only totals {same} the real run's")
    return out


def main() -> None:
    torch.set_num_threads(1)
    model, inputs, options = mit()
    rows = [
        bench("wrn-28-10 (1x3x32x32)", *wrn(), rounds=9),
        bench("mobilenet-v2-1.4 (1x3x224x224)", *mobilenet(), rounds=11),
        bench("jaist-qrnn (96 tokens, batch 1)", *qrnn(), rounds=5),
        bench("mit-lm (96 tokens, full memory and cache)", model, inputs, rounds=15, options=options),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 1, "torch": torch.__version__, "machine": platform.machine(), "processor": cpu_name()}
    RESULTS.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print("\n".join(notes(rows)))


if __name__ == "__main__":
    main()
