"""Example inputs for counting without data: from the command line (``--input``), the rule set's track, or the
bundled architecture.

``--input 1x3x224x224`` is a float tensor of that shape (zeros, as the rule set's image example); ``--input
ids:1x128`` a tensor of token ids drawn (with a fixed seed) from the model's vocabulary. Several ``--input``
give the forward several positional arguments, in order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.errors import MicronetError

HOW = ("give one with --input 1x3x32x32 (a float tensor of that shape) or --input ids:1x128 (token ids), once per "
       "argument of the forward, or the test data with --data DIR, or an image track with --track imagenet|cifar100")

_SPEC = re.compile(r"^(?:(float|ids):)?(\d+(?:x\d+)*)$")


def parse(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"1x3x32x32"`` -> ``("float", (1, 3, 32, 32))``; ``"ids:1x128"`` -> ``("ids", (1, 128))``."""
    match = _SPEC.match(spec.strip().lower())
    if not match or any(int(d) == 0 for d in match.group(2).split("x")):
        raise MicronetError(f"--input {spec!r}: give a shape such as 1x3x224x224, or ids:1x128 for token ids")
    return match.group(1) or "float", tuple(int(d) for d in match.group(2).split("x"))


def vocabulary_size(model: nn.Module) -> int | None:
    """The number of token ids a model reads: its config's ``vocab_size``/``n_vocab``, its ``vocabulary``, else
    the rows of its first embedding."""
    config = getattr(model, "config", None)
    for value in (getattr(config, "vocab_size", None), getattr(config, "n_vocab", None),
                  getattr(model, "vocabulary", None)):
        if isinstance(value, int) and value > 0:
            return value
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


def from_specs(specs: Sequence[str], model: nn.Module) -> tuple[Tensor, ...]:
    """The tensors that ``--input`` options describe, for ``model``."""
    inputs = []
    for spec in specs:
        kind, shape = parse(spec)
        if kind == "float":
            inputs.append(torch.zeros(shape))
            continue
        vocab = vocabulary_size(model)
        if vocab is None:
            raise MicronetError(f"--input {spec}: the model's vocabulary size is unknown (no config.vocab_size and "
                                "no nn.Embedding; a .pt2 program counts on its exported inputs without --input)")
        generator = torch.Generator().manual_seed(0)
        inputs.append(torch.randint(0, vocab, shape, generator=generator))
    return tuple(inputs)


def example_inputs(loaded: Any, rules: Any, track: str | None, specs: Sequence[str] | None = None) -> tuple:
    """The inputs to count a loaded model on: ``--input`` where given; else a program's exported inputs; else one
    sample of the track's ``input_shape`` in the rule set; else the bundled architecture's; else an error that
    says how to give one."""
    if specs:
        return from_specs(specs, loaded.model)
    if loaded.example_inputs is not None:
        return tuple(loaded.example_inputs)
    shape = rules.track(track).input_shape if track else None
    if shape:
        return (torch.zeros(shape),)
    if loaded.spec is not None and loaded.spec.example_inputs is not None:
        return tuple(loaded.spec.example_inputs(loaded.model))
    raise MicronetError(f"no example input known for {loaded.name}: {HOW}")
