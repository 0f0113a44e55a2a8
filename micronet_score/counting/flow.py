"""How operand widths flow through ops: which outputs keep the width of what they read.

A value stored at b bits, or marked b bits by a fake quantizer, stays b bits through ops that only move it
(views, copies, lookups, joins) or pick among its values (relu, max, max pooling). Arithmetic produces values of
unknown width (counted at the declared activation width), so any op not listed here drops the mark.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch

aten = torch.ops.aten


class Flow(Enum):
    MOVE = "move"
    """views and rearrangements: the output carries the mark of args[0]"""
    COPY = "copy"
    """copies: a copy of a stored tensor is that tensor (its width and density); of a marked one, marked"""
    LOOKUP = "lookup"
    """lookups, gathers, padding, embedding(weight, indices): the output has the width of the stored or marked
    tensor args[0]"""
    JOIN = "join"
    """cat/stack of args[0]: the widest mark when all parts are marked"""
    PICK = "pick"
    """relu, max, max pooling: the output keeps the widest mark of its tensor inputs (all marked)"""
    SCALAR = "scalar"
    """a tensor read as a Python number (a quantizer's scale): a stored value needed for inference"""


def _table(flows: dict[Flow, tuple[str, ...]]) -> dict[Any, Flow]:
    table: dict[Any, Flow] = {}
    for flow, names in flows.items():
        for name in names:
            packet = getattr(aten, name, None)
            if packet is not None:
                assert packet not in table, f"aten.{name} has two width flows"
                table[packet] = flow
    return table


FLOW = _table(
    {
        Flow.MOVE: (
            "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "squeeze",
            "unsqueeze", "select", "slice", "alias", "as_strided", "unflatten", "flatten", "detach", "unbind",
            "split", "split_with_sizes", "unsafe_split", "chunk", "narrow", "lift_fresh", "view_as", "expand_as",
        ),
        Flow.COPY: ("clone", "_to_copy", "lift_fresh_copy", "_reshape_copy"),
        Flow.LOOKUP: (
            "index", "index_select", "gather", "_unsafe_index", "constant_pad_nd", "repeat", "roll", "flip",
            "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
            "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "pixel_shuffle", "pixel_unshuffle",
            "channel_shuffle", "masked_select", "diagonal", "movedim", "unfold", "reflection_pad1d",
            "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
            "dequantize", "embedding",
        ),
        Flow.JOIN: ("cat", "stack"),
        Flow.PICK: (
            "relu", "relu_", "amax", "amin", "max", "min", "max_pool1d", "max_pool2d", "max_pool2d_with_indices",
            "max_pool3d", "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d",
        ),
        Flow.SCALAR: ("_local_scalar_dense", "item"),
    }
)  # fmt: skip
"""overload packet -> how the widths of its inputs reach its output"""
