"""Speed of the mit-lm evaluation at full size: the best configuration (8.3M parameters, 9-bit quantizers,
n_cache 3000) with random weights, on a generated stream with the test split's bin mix.

    .venv/bin/python benchmarks/bench_mit_eval.py [--predictions 245568] [--chunk 4032] [--counter] [--threads N]

Reports tokens/s, the extrapolated time for the 245,568 test predictions and peak RSS, as JSON (one entry per
mode, "plain", "counter" or either with "-reference", in benchmarks/results/mit_eval.json; run each mode in its own
process so that the peak RSS is its own). With ``--counter`` the evaluation counts operations in the same pass with
the real Counter, as ``micronet-score eval`` does: the fast paths run (the fused head, the attention band and the
cache window as padded band products), priced as their reference computations through pricing hints
(``counting/hints.py``), each once per shape; ``--reference`` runs the reference computations themselves (plain
or counted), for comparison ("plain-reference" / "counter-reference"). A plain run states its ratio to the machine's
matmul limit for the raw operations that a counter run of the same stream counted (run ``--counter`` first).
Targets (issue 16): at most 4x the matmul limit, at most 60 s on a quiet machine, at most 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
from micronet_score.models.mit_lm import MitLM, MitLMConfig, example_tokens

from micronet_score import Counter
from micronet_score.evaluate_lm import evaluate_stream

TEST_PREDICTIONS = 245_568


def build() -> MitLM:
    torch.manual_seed(0)
    model = MitLM(MitLMConfig(cache_theta=0.02, cache_lambda=0.15)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("max_abs"):
                buf.fill_(4.0)
            elif name.endswith("inv_scale"):
                buf.fill_(4.0 / 255)
    return model


def matmul_limit(ops_per_token: float, predictions: int, seconds: float) -> dict:
    """The time the machine's measured fp32 matrix-multiply rate (benchmarks/machine.py) allows for the same raw
    operations (mults + adds + others), and the evaluation's ratio to it."""
    machine = Path(__file__).parent / "results" / "machine.json"
    if not machine.exists():
        return {}
    rate = json.loads(machine.read_text())["gflops_all_threads"] * 1e9
    limit = ops_per_token * predictions / rate
    return {"raw_ops_per_token": round(ops_per_token, 1), "matmul_limit_seconds": round(limit, 2),
            "ratio_to_matmul_limit": round(seconds / limit, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--predictions", type=int, default=TEST_PREDICTIONS)
    parser.add_argument("--chunk", type=int, default=4032)
    parser.add_argument("--counter", action="store_true", help="count operations in the same pass")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--reference", action="store_true",
                        help="evaluation through the reference computations (what counting prices) instead of the "
                             "fast paths, for comparison")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mit_eval.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build()
    for part in (model.loss, model.loss.cache, *model.layers):
        part.fused = not args.reference
    tokens = example_tokens(model.config, args.predictions + 1, seed=0)
    counter = None
    if args.counter:
        counter = Counter(model, track="wikitext103", bits=model.config.bits)
    cpu = time.process_time()
    result = evaluate_stream(model, tokens, chunk=args.chunk, progress=None, counter=counter)
    cpu = time.process_time() - cpu
    rate = result.tokens_per_second
    out = {
        "mode": ("counter" if counter else "plain") + ("-reference" if args.reference else ""),
        "predictions": result.predictions,
        "chunk": args.chunk,
        "seconds": round(result.seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "tokens_per_second": round(rate, 1),
        "extrapolated_test_split_seconds": round(TEST_PREDICTIONS / rate, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "nll_random_weights": round(result.nll, 4),
        "nll_random_weights_exact": result.nll,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    if counter is not None:
        report = counter.report()
        out["counted_flops_per_token"] = round(report.flops, 1)
        out["counted_tokens"] = report.samples
        out["uncounted_ops"] = [u.op for u in report.uncounted]
        out["conversions"] = report.conversions
        out.update(matmul_limit(report.mults + report.adds + report.others, result.predictions, result.seconds))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    counted = previous.get("counter", {})
    if counter is None and counted.get("predictions") == result.predictions and "raw_ops_per_token" in counted:
        # the counts do not depend on the path (the counter's run counted this same stream)
        out.update(matmul_limit(counted["raw_ops_per_token"], result.predictions, result.seconds))
    results = previous if any(key.startswith(("plain", "counter")) for key in previous) else {}
    results[out["mode"]] = out
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
