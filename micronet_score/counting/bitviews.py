"""Tensors seen as their bits: an integer numpy view of a CPU tensor's values, in which a zero is an integer
zero (floats after a shift left by one, which drops the sign of -0.0). Counting nonzeros and block occupancy on
these views is several times faster than comparing floats."""

from __future__ import annotations

import numpy as np
import torch

BIT_VIEWS = {
    torch.float32: (torch.int32, 1),
    torch.float64: (torch.int64, 1),
    torch.float16: (torch.int16, 1),
    torch.bfloat16: (torch.int16, 1),
    torch.int64: (torch.int64, 0),
    torch.int32: (torch.int32, 0),
    torch.int16: (torch.int16, 0),
    torch.int8: (torch.int8, 0),
    torch.uint8: (torch.uint8, 0),
    torch.bool: (torch.uint8, 0),
}
"""dtype -> (integer view, shift): a float x != 0 exactly when (bits << 1) != 0 (the sign of -0.0 shifted out)."""


def on_bits(t: torch.Tensor) -> bool:
    """Whether the tensor has an integer view of its values (a plain contiguous CPU tensor of a listed dtype)."""
    return (
        t.dtype in BIT_VIEWS
        and t.device.type == "cpu"
        and type(t) is torch.Tensor
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


def integer_bits(tensor: torch.Tensor) -> tuple[np.ndarray, bool] | None:
    """The tensor's bits as a numpy integer array and whether a shift left by one tells its zeros (floats: the
    sign of -0.0 shifted out), or None where no such view exists (another dtype or device)."""
    if not on_bits(tensor):
        return None
    view, shift = BIT_VIEWS[tensor.dtype]
    return tensor.view(view).numpy(), bool(shift)
