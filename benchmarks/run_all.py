"""Every benchmark, one command: writes benchmarks/results/*.json and prints Markdown tables.

    .venv/bin/python benchmarks/run_all.py [--eval-predictions 4032] [--skip-eval]

1. machine.py: this machine's fp32 matmul GFLOP/s, one thread and all threads (results/machine.json);
2. bench_peers.py: counting / forward ratios against fvcore and FlopCounterMode on WRN-28-10, MobileNetV2-1.4,
   the QRNN and the MIT LM, with shape-only counting (results/peers.json);
3. bench_counting.py: Counter.measure and count() on WRN-28-10 and a transformer layer (results/counting.json);
4. bench_snapshot.py: one inference snapshot (Counter.snapshot) against one training step, WRN-16-4 and a small
   transformer LM, warm and cold (results/snapshot.json);
5. bench_mit_eval.py, as a subprocess with a small --predictions (results/mit_eval_quick.json; the full-split
   run writes results/mit_eval.json: see that script), with its rate against the machine's matmul limit.

Each step runs in its own process (fresh threads settings, no state carried between benchmarks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> bool:
    print(f"\n## {script} {' '.join(args)}".rstrip(), flush=True)
    done = subprocess.run([sys.executable, str(HERE / script), *args], check=False)
    if done.returncode != 0:
        print(f"(failed: exit status {done.returncode})", flush=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-predictions", type=int, default=4032)
    parser.add_argument("--skip-eval", action="store_true", help="skip the MIT evaluation-throughput benchmark")
    args = parser.parse_args()
    ok = run("machine.py")
    ok &= run("bench_peers.py")
    ok &= run("bench_counting.py")
    ok &= run("bench_snapshot.py")
    if not args.skip_eval:
        out = RESULTS / "mit_eval_quick.json"
        if run("bench_mit_eval.py", "--predictions", str(args.eval_predictions), "--out", str(out)):
            summary(out)
        else:
            ok = False
    sys.exit(0 if ok else 1)


def summary(eval_json: Path) -> None:
    """The evaluation's arithmetic rate (counted operations per token x tokens/s) against the matmul rate."""
    try:
        machine = json.loads((RESULTS / "machine.json").read_text())
        evaluation = json.loads(eval_json.read_text())
        peers = json.loads((RESULTS / "peers.json").read_text())
    except (OSError, ValueError) as err:
        print(f"(no limit ratio: {err})")
        return
    mit = next((r for r in peers["rows"] if r["model"].startswith("mit-lm")), None)
    rate = evaluation.get("tokens_per_second")
    threads = evaluation.get("threads")
    if mit is None or not rate:
        return
    t = mit["totals"]
    ops_per_token = t["mults"] + t["adds"] + t["others"]  # operations the fp32 forward performs, per token
    limit = machine["gflops_all_threads"] if threads and threads > 1 else machine["gflops_1_thread"]
    achieved = ops_per_token * rate / 1e9
    print(
        f"\nmit-lm evaluation: {rate:,.0f} tokens/s x {ops_per_token / 1e6:.1f} M counted operations per token = "
        f"{achieved:.2f} G operations/s; this machine's fp32 matmul rate with {threads} thread(s): "
        f"{limit:.1f} GFLOP/s; the evaluation runs at {achieved / limit:.1%} of that limit"
    )


if __name__ == "__main__":
    main()
