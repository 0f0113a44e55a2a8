"""The MIT LM's fused head against its reference path, interleaved: the same plain evaluation (full-size best
configuration, random weights, 3,000-entry cache) of the same stream, once through each head, round after round.

    .venv/bin/python benchmarks/bench_mit_head.py [--predictions 8064] [--rounds 3] [--threads 1]

Each round evaluates the stream with the reference head (the log-softmax of every bin written block by block, as
counting runs it) and with the fused head (tail normalisers summed in cache-sized blocks); the ratio is the median
over rounds of fused time / reference time, so load from other processes moves both sides together. Also the
relative difference of the two mean NLLs (target: 1e-6). Writes benchmarks/results/mit_head.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from bench_mit_eval import build
from micronet_score.models.mit_lm import example_tokens
from timing import save_results

from micronet_score.evaluate_lm import evaluate_stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--predictions", type=int, default=2 * 4032)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mit_head.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    tokens = example_tokens(model.config, args.predictions + 1, seed=0)

    def run(fused: bool):
        model.loss.fused = fused
        return evaluate_stream(model, tokens, progress=False)

    run(True)  # warm up
    times: dict[str, list[float]] = {"reference": [], "fused": []}
    nll = {}
    for r in range(args.rounds):
        for name in (("reference", "fused") if r % 2 == 0 else ("fused", "reference")):
            result = run(name == "fused")
            times[name].append(result.seconds)
            nll[name] = result.nll
    ratios = [f / ref for f, ref in zip(times["fused"], times["reference"], strict=True)]
    out = {
        "predictions": args.predictions,
        "threads": args.threads,
        "rounds": args.rounds,
        "reference_seconds": [round(t, 2) for t in times["reference"]],
        "fused_seconds": [round(t, 2) for t in times["fused"]],
        "fused_over_reference_median": round(statistics.median(ratios), 3),
        "fused_tokens_per_second_best": round(args.predictions / min(times["fused"]), 1),
        "reference_tokens_per_second_best": round(args.predictions / min(times["reference"]), 1),
        "nll_reference": nll["reference"],
        "nll_fused": nll["fused"],
        "nll_relative_difference": abs(nll["fused"] - nll["reference"]) / abs(nll["reference"]),
        "perplexity_relative_difference": abs(torch.tensor(nll["fused"] - nll["reference"], dtype=torch.float64)
                                              .expm1().item()),
    }
    save_results(out, args.out)


if __name__ == "__main__":
    main()
