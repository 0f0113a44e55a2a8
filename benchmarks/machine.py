"""This machine's fp32 matrix-multiply rate: the limit that throughput benchmarks state their ratio against.

Times ``a @ b`` for 1024x1024 fp32 matrices (2 * 1024^3 flops each), median of repeats, on one thread and on
all threads torch uses; writes benchmarks/results/machine.json (GFLOP/s, CPU, cores, torch).

Run: .venv/bin/python benchmarks/machine.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "machine.json"
N = 1024


def gflops(threads: int, repeats: int = 15) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(N, N, generator=gen), torch.randn(N, N, generator=gen)
        out = torch.empty(N, N)
        for _ in range(3):  # warm up
            torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
        return 2 * N**3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(previous)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure() -> dict:
    threads = torch.get_num_threads()
    return {
        "matmul": f"{N}x{N} @ {N}x{N} fp32, median of 15",
        "gflops_1_thread": round(gflops(1), 1),
        "gflops_all_threads": round(gflops(threads), 1),
        "threads": threads,
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    result = measure()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
