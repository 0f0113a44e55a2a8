"""torch.ao quantized modules: their packed weights are parameters at their integer width, not zero.

``torch.ao.nn.quantized`` Linear/Conv and ``torch.ao.nn.quantized.dynamic`` Linear keep their weight and bias in
a packed torchbind object, invisible to ``named_parameters``. :func:`packed_modules` unpacks them with
``module.weight()`` / ``module.bias()`` so that storage counts them (the integer weight at its dtype width plus
its scales and zero points; the float bias at its declared width) and the interpreter prices their ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from micronet_score.counting.grid import dtype_bits


@dataclass(slots=True)
class Packed:
    """The unpacked weight of one quantized module."""

    module: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    nonzeros: int
    scales: int
    """weight scales (and as many zero points): 1 per tensor, or one per output channel"""
    static: bool
    """a static module also stores its output scale and zero point (the requantization of its output)"""

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def terms(self) -> int:
        """Length of one output's dot product (in_features, or cin/groups * kernel)."""
        return self.weight.numel() // self.weight.shape[0]


def packed_modules(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[str, Packed]:
    """Every module of the model whose weight lives in packed params, by module path (``modules``: the
    model's ``named_modules()`` when already known)."""
    found = {}
    for path, module in (modules if modules is not None else dict(model.named_modules())).items():
        if not hasattr(module, "_packed_params") or isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not callable(getattr(module, "weight", None)):
            continue
        weight = module.weight()
        if not isinstance(weight, torch.Tensor):
            continue
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        values = weight.dequantize() if weight.is_quantized else weight
        per_channel = weight.is_quantized and weight.qscheme() in (
            torch.per_channel_affine,
            torch.per_channel_symmetric,
            torch.per_channel_affine_float_qparams,
        )
        found[path] = Packed(
            module=path,
            weight=weight,
            bias=bias if isinstance(bias, torch.Tensor) else None,
            bits=dtype_bits(weight.dtype),
            nonzeros=int(torch.count_nonzero(values)),
            scales=weight.q_per_channel_scales().numel() if per_channel else 1,
            static="dynamic" not in type(module).__module__,
        )
    return found
