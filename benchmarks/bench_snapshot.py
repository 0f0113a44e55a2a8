"""One inference snapshot (Counter.snapshot) against one training step of the same model.

A training step: zero_grad, forward, loss, backward, SGD step (momentum 0.9), on a training batch. A snapshot:
``counter.snapshot(example)`` on one example, the model's cost as deployed (eval-mode graph, current weights);
warm = the same Counter again right after a training step (meta copy kept; every weight changed by the step, so
every nonzero is recounted: the realistic case), cold = a new Counter (weight table and meta copy built).
"real warm" = ``snapshot(example, shape_only=False)``: the real model in eval mode under no_grad.
Single thread, median over interleaved rounds (see timing.py): each round runs the training step, then every
snapshot, so load from other processes moves both sides of a ratio together.

Run: .venv/bin/python benchmarks/bench_snapshot.py   (writes benchmarks/results/snapshot.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from micronet_score.models.wrn import WideResNet
from torch import nn

import micronet_score as ms

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved

TARGET = 0.1
"""a warm snapshot costs at most 0.1x a training step (issue 18)"""


class TinyTransformerLM(nn.Module):
    """A small causal transformer LM: embedding, 2 encoder layers (d=256, 4 heads, ff 1024), tied-free head."""

    def __init__(self, vocab: int = 2000, d: int = 256, layers: int = 2, context: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.position[:t]
        return self.head(self.norm(self.encoder(h, mask=self.mask[:t, :t], is_causal=True)))


def bench(name: str, model: nn.Module, batch: tuple, example: torch.Tensor, track: str, rounds: int) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = batch

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        out = model(inputs)
        loss = nn.functional.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out, targets.flatten())
        loss.backward()
        optimizer.step()

    counter = ms.Counter(model, track=track)
    variants = {
        "warm": lambda: counter.snapshot(example),
        "cold": lambda: ms.Counter(model, track=track).snapshot(example),
        "real_warm": lambda: counter.snapshot(example, shape_only=False),
    }
    step_s, ratios, errors = interleaved(step, variants, rounds)
    report = counter.snapshot(example)
    return {
        "model": name,
        "training_batch": list(inputs.shape),
        "snapshot_example": list(example.shape),
        "params": sum(p.numel() for p in model.parameters()),
        "training_step_ms": step_s * 1e3,
        **{f"{k}_ms": (r * step_s * 1e3 if r is not None else None) for k, r in ratios.items()},
        **{f"{k}_ratio": r for k, r in ratios.items()},
        "errors": errors,
        "snapshot_flops": report.flops,
        "snapshot_storage": report.params,
        "met": ratios["warm"] is not None and ratios["warm"] <= TARGET,
        "rounds": rounds,
    }


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = [
        bench(
            "WRN-16-4 (ResNet-style, CIFAR 32x32), batch 32",
            WideResNet(16, 4, 100),
            (torch.randn(32, 3, 32, 32), torch.randint(0, 100, (32,))),
            torch.randn(1, 3, 32, 32),
            "cifar100",
            9,
        ),
        bench(
            "transformer LM (2 layers, d=256, vocab 2000), batch 8x128 tokens",
            TinyTransformerLM(),
            (torch.randint(0, 2000, (8, 128)), torch.randint(0, 2000, (8, 128))),
            torch.randint(0, 2000, (1, 128)),
            "wikitext103",
            9,
        ),
    ]
    out = Path(__file__).parent / "results" / "snapshot.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": 1, "target_warm_ratio": TARGET, "results": results}
    out.write_text(json.dumps(meta, indent=2) + "\n")
    print("| model | training step ms | snapshot warm | cold | real warm | target <= 0.1x |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cells = [
            f"{r[f'{k}_ms']:.1f} ms ({r[f'{k}_ratio']:.3f}x)" if r[f"{k}_ms"] else "fails"
            for k in ("warm", "cold", "real_warm")
        ]
        verdict = "met" if r["met"] else "missed"
        print(f"| {r['model']} | {r['training_step_ms']:.1f} | {' | '.join(cells)} | {verdict} |")


if __name__ == "__main__":
    main()
