"""Counting time / one plain forward, against peer counters; one thread, same process, median of repeats (issue 8).

Counters: micronet-score's Counter inside ``measure`` and the full ``count()``, fvcore's FlopCountAnalysis
(a fresh analysis per repeat: it traces the model) and torch.utils.flop_counter.FlopCounterMode; plus a
shape-only ``count()`` on the meta device for WRN-28-10, whose totals must equal the real run's.

Run: .venv/bin/python benchmarks/bench_peers.py   (writes benchmarks/results/peers.json, prints a Markdown table)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from micronet_score.models.mobilenet_v2 import MobileNetV2
from micronet_score.models.registry import get
from micronet_score.models.wrn import WideResNet
from torch import nn

import micronet_score as ms

from bench_counting import median_seconds  # same folder: run as a script

RESULTS = Path(__file__).parent / "results" / "peers.json"


def fvcore_total(model: nn.Module, x: torch.Tensor) -> float:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return float(analysis.total())


def flop_counter_total(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        model(x)
    return float(mode.get_total_flops())


def bench(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    counter = ms.Counter(model)

    def measured() -> None:
        with counter.measure(samples=1):
            model(x)

    row: dict = {"model": name, "repeats": repeats}
    with torch.no_grad():
        plain = median_seconds(lambda: model(x), repeats)
        row["forward_ms"] = plain * 1e3
        peers = {
            "micronet_measure": measured,
            "micronet_count": lambda: ms.count(model, x),
            "fvcore": lambda: fvcore_total(model, x),
            "flop_counter": lambda: flop_counter_total(model, x),
        }
        for key, fn in peers.items():
            try:
                row[f"{key}_ratio"] = median_seconds(fn, repeats) / plain
            except Exception as err:  # a peer that cannot trace this model: recorded, not fatal
                row[f"{key}_ratio"] = None
                row[f"{key}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def meta_row(repeats: int) -> dict:
    """WRN-28-10 counted from shapes alone (meta device) against one real forward; the totals must agree."""
    torch.manual_seed(0)
    real = WideResNet(28, 10).eval()
    with torch.no_grad():  # the random init holds an exact zero (in blocks.9.conv2): a sparse weight, not dense
        for p in real.parameters():
            p.masked_fill_(p == 0, 1e-3)
    meta = copy.deepcopy(real).to("meta")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = median_seconds(lambda: real(x), repeats)
        shape_only = median_seconds(lambda: ms.count(meta, x.to("meta")), repeats)
        a, b = ms.count(real, x), ms.count(meta, x.to("meta"))
    totals_real, totals_meta = (a.mults, a.adds, a.others, a.params), (b.mults, b.adds, b.others, b.params)
    assert totals_real == totals_meta, (totals_real, totals_meta)
    return {
        "model": "wrn-28-10 shape-only count on meta (1x3x32x32)",
        "repeats": repeats,
        "forward_ms": plain * 1e3,
        "meta_count_ratio": shape_only / plain,
        "identical_totals": True,
        "totals": dict(zip(("mults", "adds", "others", "params"), totals_real, strict=True)),
    }


def qrnn_model() -> nn.Module:
    spec = get("jaist-qrnn")
    model = spec.build(spec.default_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def table(rows: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        if key not in row:
            return ""
        value = row[key]
        return "fails" if value is None else f"{value:.2f}x"

    keys = ["micronet_measure_ratio", "micronet_count_ratio", "fvcore_ratio", "flop_counter_ratio", "meta_count_ratio"]
    lines = [
        "| model | forward ms | Counter.measure | count() | fvcore | FlopCounterMode | meta count() |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['forward_ms']:.1f} | " + " | ".join(cell(row, k) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [
        bench("wrn-28-10 (1x3x32x32)", WideResNet(28, 10).eval(), torch.randn(1, 3, 32, 32), 7),
        bench("mobilenet-v2-1.4 (1x3x224x224)", MobileNetV2(1.4).eval(), torch.randn(1, 3, 224, 224), 7),
        bench("jaist-qrnn (96 tokens, batch 1)", qrnn_model(), torch.randint(0, 267_735, (96, 1)), 3),
        meta_row(7),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": 1, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    for row in rows:
        for key, value in row.items():
            if key.endswith("_error"):
                print(f"- {row['model']}: {key[: -len('_error')]} failed: {value}")


if __name__ == "__main__":
    main()
