"""Counting time / plain forward time, single thread, median over interleaved rounds (see timing.py).

Run: .venv/bin/python benchmarks/bench_counting.py   (writes benchmarks/results/counting.json)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from micronet_score.models.wrn import WideResNet
from torch import nn

import micronet_score as ms

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    counter = ms.Counter(model)

    def counted() -> None:
        with counter.measure(samples=1):
            model(x)

    with torch.no_grad():
        plain, ratios, _ = interleaved(
            lambda: model(x), {"measure": counted, "count": lambda: ms.count(model, x)}, repeats
        )
    return {
        "model": name,
        "forward_ms": plain * 1e3,
        "measure_ms": ratios["measure"] * plain * 1e3,
        "count_ms": ratios["count"] * plain * 1e3,
        "measure_ratio": ratios["measure"],
        "count_ratio": ratios["count"],
        "repeats": repeats,
    }


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = [
        bench("wrn-28-10 (1x3x32x32)", WideResNet(28, 10).eval(), torch.randn(1, 3, 32, 32), 7),
        bench(
            "transformer encoder layer d=256 h=8 seq=97 (no_grad)",
            nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True).eval(),
            torch.randn(1, 97, 256),
            51,
        ),
    ]
    out = Path(__file__).parent / "results" / "counting.json"
    out.write_text(json.dumps({"torch": torch.__version__, "threads": 1, "results": results}, indent=2) + "\n")
    for r in results:
        print(
            f"{r['model']}: forward {r['forward_ms']:.2f} ms, measure {r['measure_ms']:.2f} ms "
            f"({r['measure_ratio']:.2f}x), count() {r['count_ms']:.2f} ms ({r['count_ratio']:.2f}x)"
        )


if __name__ == "__main__":
    main()
