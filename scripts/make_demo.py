"""Regenerate the bundled mit-lm demo (deterministic): a generated WikiText-style corpus, a tiny model trained on
it for about a minute on the CPU, activation ranges calibrated on one 1152-token batch, weights quantized on the
9-bit symmetric grid as the authors' post-processing did (specs/mit-lm.md §5.1), saved in the authors' format
``{'net': state_dict, 'step': 1}`` with a ``config.yaml``-style file.

    .venv/bin/python scripts/make_demo.py [--out models/demo]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from micronet_score.models.mit_lm import MitLM, MitLMConfig

from micronet_score.data.wikitext import Vocabulary, load_split
from micronet_score.evaluate_lm import evaluate_stream

BITS = 9
ARCH = dict(n_layers=2, n_embed=64, n_embeds=[64, 16, 4], n_head=2, n_k=16, n_v=16, n_inner=128, n_seq=32)


def corpus(seed: int, n_articles: int) -> str:
    """Articles with a heading, a few topic words that recur (the cache's business) and sentences from a small
    grammar with Zipf-distributed word choice (the model's business)."""
    rng = random.Random(seed)
    det = ["the", "a", "this", "every", "no"]
    adj = [f"adj{i}" for i in range(150)]
    noun = [f"noun{i}" for i in range(500)]
    verb = [f"verb{i}" for i in range(120)]
    names = [f"Name{i}" for i in range(1500)]
    zipf = lambda xs: xs[min(int(rng.paretovariate(1.1)) - 1, len(xs) - 1)]  # noqa: E731
    lines = []
    for _ in range(n_articles):
        topic = rng.sample(names, 4)
        lines += ["", f" = {topic[0]} {topic[1]} = ", ""]
        for _ in range(rng.randint(2, 5)):
            sentences = []
            for _ in range(rng.randint(2, 5)):
                subject = rng.choice(topic) if rng.random() < 0.4 else f"{rng.choice(det)} {zipf(noun)}"
                obj = [rng.choice(det)] + ([zipf(adj)] if rng.random() < 0.5 else []) + [zipf(noun)]
                sentences.append(" ".join([subject, zipf(verb), *obj, "of", rng.choice(topic), "."]))
            lines.append(" " + " ".join(sentences) + " ")
    return "\n".join(lines) + "\n"


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero the low ``bits`` bits of each float32 (the authors' truncated inverse scale)."""
    return (x.float().contiguous().view(torch.int32) & ~((1 << bits) - 1)).view(torch.float32)


def quantize_weight(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """round(w·s)·trunc(1/s) with s = (2^(b-1) - 1)/max|w| per row (Linear) or per tensor (Embedding)."""
    top = 2 ** (BITS - 1) - 1
    m = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
    s = top / m.clamp_min(1e-12)
    return torch.round(w * s) * truncate_mantissa(1 / s, BITS)


def quantize_bias(b: torch.Tensor) -> torch.Tensor:
    s = (2 ** (BITS - 1) - 1) / b.abs().max().clamp_min(1e-12)
    return torch.round(b * s) / s


def train(model: MitLM, tokens: torch.Tensor, seconds: float, chunk: int = 256) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    start, step, state = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        begin = (step * chunk) % (len(tokens) - chunk - 1)
        if begin < chunk:
            state = None
        nll, state = model(tokens[begin : begin + chunk], tokens[begin + 1 : begin + chunk + 1], state)
        opt.zero_grad()
        nll.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step += 1
    model.eval()
    print(f"trained {step} steps, last loss {nll.mean().item():.3f}")


def calibrate(model: MitLM, tokens: torch.Tensor) -> dict[str, float]:
    """max |activation| at each quantization point (the Identity slots of the float model) on one batch."""
    seen: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Identity) and not name.endswith(("fc.2", "fc.5")):
            def hook(_m, _inp, out, name=name):
                seen[name] = max(seen.get(name, 0.0), out.abs().max().item())
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(tokens[:-1], tokens[1:])
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models" / "demo"))
    parser.add_argument("--train-seconds", type=float, default=60.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = Path(args.out)
    data = out / "wikitext-demo"
    data.mkdir(parents=True, exist_ok=True)
    text = {"train": corpus(1, 2500), "valid": corpus(2, 120), "test": corpus(3, 120)}
    (data / "wiki.train.tokens").write_text(text["train"])
    vocab = Vocabulary.by_frequency(data / "wiki.train.tokens")
    for split in ("valid", "test"):  # keep only lines whose words the training split has
        kept = [ln for ln in text[split].split("\n") if all(w in vocab.index for w in ln.split())]
        (data / f"wiki.{split}.tokens").write_text("\n".join(kept))
    n_vocab = len(vocab)
    arch = {**ARCH, "cutoffs": [200, 800], "n_vocab": n_vocab}
    cache_dir = Path("/tmp/micronet-demo-cache")
    train_ids = load_split(data, "train", vocab, cache_dir=cache_dir)
    valid_ids = load_split(data, "valid", vocab, cache_dir=cache_dir)

    fp = MitLM(MitLMConfig.from_mapping({**arch, "quantized": False, "use_cache": False}))
    train(fp, train_ids, args.train_seconds)
    ranges = calibrate(fp, train_ids[:1153])

    best = None
    for theta in (0.05, 0.1, 0.2):
        for lam in (0.05, 0.1, 0.2):
            q = MitLM(MitLMConfig.from_mapping({**arch, "n_cache": 200, "cache_theta": theta, "cache_lambda": lam}))
            sd = q.state_dict()
            for k, v in fp.state_dict().items():
                if k in sd:
                    sd[k] = v
            net = {}
            for k, v in sd.items():
                if k.endswith(".max_abs"):
                    net[k] = torch.tensor([ranges[k[: -len(".max_abs")]]])
                elif k.endswith(".inv_scale"):
                    scale = ranges[k[: -len(".inv_scale")]] / (2 ** (BITS - 1) - 1)
                    net[k] = truncate_mantissa(torch.tensor(scale), BITS)
                elif k.endswith("pos_emb") or ".ln" in k:
                    net[k] = v.clone()
                elif k.endswith(".bias"):
                    net[k] = quantize_bias(v)
                else:
                    net[k] = quantize_weight(v, per_row=not k.startswith("embed.layers."))
            q.load_state_dict(net)
            ppl = evaluate_stream(q, valid_ids, chunk=1024, progress=False).perplexity
            print(f"theta {theta} lambda {lam}: valid ppl {ppl:.2f}")
            if best is None or ppl < best[0]:
                best = (ppl, theta, lam, net)
    ppl, theta, lam, net = best
    torch.save({"net": net, "step": 1}, out / "mit_lm_demo.pth")
    config = {**arch, "bits": BITS, "n_cache": 200, "cache_theta": theta, "cache_lambda": lam, "use_cache": True,
              "eval_batch": 1, "eval_chunk": 42 * arch["n_seq"], "model": "quantize.Transformer", "pos_emb": "trained"}
    (out / "mit_lm_demo.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    print(f"demo: {n_vocab} words, valid ppl {ppl:.2f} (theta {theta}, lambda {lam}); files in {out}")
    np.random.seed(0)


if __name__ == "__main__":
    main()
