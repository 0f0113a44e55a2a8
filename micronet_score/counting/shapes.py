"""Shape-only counting: the forward runs on a meta copy of the model (no values computed), priced with the real
model's widths, densities and storage.

The copy shares nothing with the real model: its modules are deep copies whose parameters and buffers are meta
tensors of the same shapes, dtypes and requires_grad. Each meta tensor's storage maps back to its real tensor's
storage, so the interpreter finds the real weight table (nonzeros counted from the real values, widths, pruning
masks) under the meta keys, and what it learns about storage (tensors read, folded away) is translated back.
The real model is only read: its values, attributes and version counters stay as they were.

A forward whose control flow depends on tensor values (``if x.sum() > 0``, ``.item()``, ``.tolist()``,
``nonzero``) cannot run on meta tensors: :class:`MicronetError` says so, and to count without shape_only. The
ops whose result depends on values (DATA_DEPENDENT) are refused by name on meta tensors, never given an assumed
size; mixture-of-experts layers count when their shapes do not depend on the routing (``_grouped_mm``).

For speed, the outputs of the ops whose meta kernels are slow Python references are made directly (META_FAST),
each with exactly the sizes, strides and dtype torch's kernel gives it (counting.layouts).
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from micronet_score.counting import layouts
from micronet_score.counting.storage import Pruned, Walk, WeightTable, storage_key
from micronet_score.errors import MicronetError


@dataclass
class MetaCopy:
    """A meta copy of a model and the map from its storages to the real model's."""

    model: nn.Module
    walk: Walk
    real_key: dict[int, int]
    """meta storage key -> real storage key"""

    @classmethod
    def of(cls, model: nn.Module, walk: Walk, shared: tuple[Any, ...] = ()) -> MetaCopy:
        """``shared``: objects the copy refers to as they are instead of copying them (a trainer the model
        points to)."""
        for path, module in walk.modules.items():
            if hasattr(module, "_packed_params"):
                raise MicronetError(
                    f"shape-only counting cannot copy module {path or '<root>'!r} to the meta device (its weights are "
                    "packed torch.ao quantized params): count without shape_only"
                )
        if _all_meta(walk):  # already on meta (a model counted from its files): the model is its own copy
            keys = {storage_key(t) for _, t in walk.parameters + walk.buffers}
            return cls(model, walk, {k: k for k in keys})
        memo: dict[int, Any] = {id(obj): obj for obj in shared}
        real_of_meta: list[tuple[torch.Tensor, torch.Tensor]] = []

        def meta(tensor: torch.Tensor) -> torch.Tensor:
            copied = memo.get(id(tensor))
            if copied is None:
                copied = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="meta")
                if isinstance(tensor, nn.Parameter):
                    copied = nn.Parameter(copied, requires_grad=tensor.requires_grad)
                elif tensor.requires_grad:
                    copied.requires_grad_(True)
                memo[id(tensor)] = copied
                real_of_meta.append((copied, tensor))
            return copied

        for _, tensor in walk.parameters + walk.buffers:
            meta(tensor)
        for module in walk.modules.values():  # plain tensor attributes of modules (not registered as buffers)
            for value in vars(module).values():
                if isinstance(value, torch.Tensor) and value.device.type != "meta":
                    meta(value)
        memo[id(memo)] = [real_of_meta]  # deepcopy keeps its memo's objects alive under this key
        try:
            copied = _copy_module(model, memo)
        except Exception as err:
            raise MicronetError(
                f"shape-only counting cannot copy the model ({type(err).__name__}: {err}): count without shape_only"
            ) from None
        real_key = {storage_key(m): storage_key(r) for m, r in real_of_meta}
        return cls(copied, Walk.of(copied), real_key)

    def follow(self, real: dict[str, nn.Module]) -> None:
        """Train or eval mode as the real modules are now."""
        for path, module in self.walk.modules.items():
            source = real.get(path)
            if source is not None and module.training != source.training:
                module.training = source.training

    def table(self, real: WeightTable) -> WeightTable:
        """The real weight table under the meta storage keys (the same TensorInfo objects)."""
        meta_key = {}
        for meta, real_key in self.real_key.items():
            meta_key.setdefault(real_key, []).append(meta)
        table = WeightTable(meta=real.meta)
        for key, info in real.by_key.items():
            for meta in meta_key.get(key, ()):
                table.by_key[meta] = info
        for pruned in real.pruned.values():
            for orig in meta_key.get(pruned.orig_key, ()):
                for mask in meta_key.get(pruned.mask_key, ()):
                    table.pruned[(orig, mask)] = Pruned(pruned.info, orig, mask, pruned.source)
        table.packed = real.packed
        return table

    def real(self, keys: Any) -> set[int]:
        """Meta storage keys translated to the real model's (keys of tensors made during the forward: dropped)."""
        return {self.real_key[k] for k in keys if k in self.real_key}


def _all_meta(walk: Walk) -> bool:
    """Every parameter, buffer and plain tensor attribute of the model is a meta tensor."""
    if not all(t.device.type == "meta" for _, t in walk.parameters + walk.buffers):
        return False
    return all(
        value.device.type == "meta"
        for module in walk.modules.values()
        for value in vars(module).values()
        if isinstance(value, torch.Tensor)
    )


_ATOMS = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.memory_format)


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, _ATOMS):
        return value
    if type(value) is tuple and all(isinstance(v, _ATOMS) for v in value):
        return value
    if isinstance(value, nn.Module):
        return _copy_module(value, memo)
    return copy.deepcopy(value, memo)


@functools.cache
def _copies_itself(cls: type) -> bool:
    """A module class with its own __deepcopy__ / __reduce__ / __reduce_ex__ is copied its own way."""
    return any(
        name in vars(base)
        for base in cls.__mro__
        if base not in (nn.Module, object)
        for name in ("__deepcopy__", "__reduce__", "__reduce_ex__")
    )


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """copy.deepcopy of a module tree whose tensors are already in ``memo``, without deep-copying what cannot
    change (numbers, strings, tuples of them) or the empty hook dicts of every module: several times faster."""
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if _copies_itself(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers"):
            state[key] = {name: None if t is None else memo[id(t)] for name, t in value.items()}
        elif key == "_modules":
            state[key] = {name: None if m is None else _copy_module(m, memo) for name, m in value.items()}
        elif isinstance(value, dict) and not value and type(value) in (dict, OrderedDict):
            state[key] = type(value)()
        else:
            state[key] = _copy_value(value, memo)
    new.__dict__.update(state)
    return new


def to_meta(value: Any) -> Any:
    """Tensors of (nested) inputs as meta tensors of the same shapes and dtypes."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="meta")
        return x

    return tree_map(convert, value)


def data_dependent(err: Exception) -> MicronetError:
    first = (str(err).splitlines() or [""])[0][:300]
    return MicronetError(
        "shape-only counting runs the forward on meta tensors, which have no values, and this forward could not "
        f"run there ({type(err).__name__}: {first}); a model whose control flow depends on data (or that uses an "
        "op without a meta kernel) must be counted without shape_only"
    )


def _fake_quant(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = args[0]
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


_aten = torch.ops.aten
META_FALLBACKS = {
    getattr(_aten, name): _fake_quant
    for name in (
        "fake_quantize_per_tensor_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
        "fake_quantize_per_channel_affine_cachemask",
        "_fused_moving_avg_obs_fq_helper",
    )
    if hasattr(_aten, name)
}
"""Ops torch has no meta kernel for, whose outputs' shapes are those of their input: (values, mask)."""


# --- fast meta outputs -------------------------------------------------------------------------------------
# torch's meta kernels for elementwise ops, cat, batch norm and activations run its Python reference
# implementations (0.1 to 0.9 ms an op, more than the real CPU op on small inputs, and most of a large model's
# shape-only forward). For the cases below the output's sizes, strides and dtype are made directly, exactly as
# torch's meta kernel makes them (tests/test_meta_layouts.py sweeps layouts against it); any other case falls
# back to torch (None).


def _plain(x: Any) -> bool:
    """A tensor whose strides are exactly the contiguous strides of its sizes (size-1 dims included): every
    kernel's output like it is laid out the same."""
    return isinstance(x, torch.Tensor) and x.is_contiguous() and x.stride() == layouts.contiguous(tuple(x.shape))


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty_like of a _plain tensor (itself a Python reference on meta, ~20 us), in ~1 us."""
    return torch.empty_strided(x.size(), x.stride(), dtype=dtype or x.dtype, device=x.device)


def _activation(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An activation of a _plain tensor (torch's meta kernels for activations differ from one another on other
    layouts)."""
    x = args[0]
    return _like(x) if _plain(x) and x.is_floating_point() else None


def _in_place(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0]
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def _batch_norm_outputs(x: Any, weight: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if not _plain(x) or x.dtype != torch.float32 or x.dim() < 2:
        return None
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32):
        return None
    channels = x.shape[1]
    return _like(x), x.new_empty((channels,)), x.new_empty((channels,))


def _native_batch_norm(args: tuple, kwargs: dict) -> tuple | None:
    return _batch_norm_outputs(args[0], args[1]) if len(args) >= 8 and not kwargs else None


def _batch_norm_no_training(args: tuple, kwargs: dict) -> tuple | None:
    return _batch_norm_outputs(args[0], args[1]) if len(args) >= 7 and not kwargs else None


def _elementwise(tensors: list[torch.Tensor], dtype: torch.dtype, opmath: bool = True) -> torch.Tensor | None:
    """The output of an elementwise op of these tensors (on one device) at ``dtype``, laid out as torch's meta
    kernels lay it out (counting.layouts), or None for torch to make it. ``opmath``: the op computes in
    layouts.computation_dtype (inputs of another dtype are converted first); else its inputs are taken as
    they are."""
    first = tensors[0]
    device = first.device
    if any(t.device != device for t in tensors):
        return None
    if (
        all(t.shape == first.shape and t.is_contiguous() for t in tensors)
        and first.numel()
        and not (first.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors))
    ):  # the common case, decided by torch's own flags: contiguous inputs of one shape give a contiguous output
        return torch.empty(first.shape, dtype=dtype, device=device)
    compute = layouts.computation_dtype(dtype) if opmath else None
    layout = layouts.elementwise([(tuple(t.shape), t.stride(), opmath and t.dtype != compute) for t in tensors])
    if layout is None:
        return None
    return torch.empty_strided(layout[0], layout[1], dtype=dtype, device=device)


def _pointwise(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Floating elementwise arithmetic of tensors of any layout (and numbers): the broadcast shape at the promoted
    dtype (torch.result_type)."""
    if len(args) > 2 or set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(isinstance(a, bool) or not isinstance(a, (torch.Tensor, int, float)) for a in args):
        return None
    if any(not t.is_floating_point() for t in tensors):
        return None
    dtype = torch.result_type(args[0], args[1]) if len(args) == 2 else tensors[0].dtype
    return _elementwise(tensors, dtype)


def _power(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """pow(x, exponent) of a floating tensor, an elementwise op (but x ** 1, which torch's reference makes a copy
    of x, left to torch)."""
    if kwargs or len(args) != 2 or isinstance(args[1], bool) or not isinstance(args[1], (int, float)):
        return None
    return None if args[1] == 1 else _pointwise(args, kwargs)


def _triangle(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """tril(x, diagonal) of a contiguous tensor: like its input, whatever its dtype."""
    x = args[0]
    return _like(x) if _plain(x) and x.dim() >= 2 else None


def _mean_dim(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """mean(x, dims, keepdim) of a floating tensor, without a dtype: the reduced shape."""
    if kwargs.get("dtype") is not None or len(args) < 2 or len(args) > 3:
        return None
    x, dims = args[0], args[1]
    keepdim = args[2] if len(args) == 3 else kwargs.get("keepdim", False)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not isinstance(dims, (list, tuple)) or not dims:
        return None
    reduced = {d % x.dim() for d in dims} if x.dim() else set()
    shape = [1 if i in reduced else n for i, n in enumerate(x.shape) if keepdim or i not in reduced]
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _cat(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """cat of tensors of one dtype and device along one dim (1-d empty tensors skipped, as torch allows):
    channels-last when every input's strides suggest it, else contiguous."""
    if kwargs or not args or len(args) > 2 or not isinstance(args[0], (list, tuple)) or not args[0]:
        return None
    tensors, dim = args[0], args[1] if len(args) == 2 else 0
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not isinstance(dim, int):
        return None
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device or t.layout != torch.strided for t in tensors):
        return None
    kept = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]
    if not kept or any(t.dim() != kept[0].dim() for t in kept) or kept[0].dim() == 0:
        return None
    rank = kept[0].dim()
    dim %= rank
    shape = list(kept[0].shape)
    if any(t.shape[:dim] != kept[0].shape[:dim] or t.shape[dim + 1 :] != kept[0].shape[dim + 1 :] for t in kept):
        return None
    shape[dim] = sum(t.shape[dim] for t in kept)
    if 0 in shape:
        return None
    sizes = tuple(shape)
    channels_last = all(layouts.like_channels_last(tuple(t.shape), t.stride()) for t in tensors)
    if channels_last and all(t.dim() == rank for t in tensors):
        strides = layouts.dense_in_order(sizes, [0, *range(2, rank), 1])
    else:
        strides = layouts.contiguous(sizes)
    return torch.empty_strided(sizes, strides, dtype=first.dtype, device=first.device)


def _convolution(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A plain (not transposed) convolution of contiguous tensors: out = floor((in + 2p - d(k - 1) - 1) / s) + 1."""
    if len(args) != 9 or kwargs:
        return None
    x, weight, _, stride, padding, dilation, transposed, _, groups = args
    if (
        transposed
        or not isinstance(x, torch.Tensor)
        or not isinstance(weight, torch.Tensor)
        or x.dim() != weight.dim()
        or x.dim() < 3
        or x.dtype != weight.dtype
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or x.shape[1] != weight.shape[1] * groups
    ):
        return None
    spatial = x.dim() - 2
    if not all(isinstance(v, (list, tuple)) and len(v) == spatial for v in (stride, padding, dilation)):
        return None
    sizes = [x.shape[0], weight.shape[0]]
    for i in range(spatial):
        size = (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        if size <= 0:
            return None
        sizes.append(size)
    return torch.empty(sizes, dtype=x.dtype, device=x.device)


def _matrix_product(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """mm(a, b), addmm(bias, a, b) and bmm(a, b) of float tensors of one dtype: a contiguous [.., n, p]."""
    if kwargs:
        return None
    a, b = args[-2], args[-1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype:
        return None
    if not a.is_floating_point() or a.dim() != b.dim() or a.dim() not in (2, 3) or a.shape[-1] != b.shape[-2]:
        return None
    if a.dim() == 3 and a.shape[0] != b.shape[0]:
        return None
    return torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device=a.device)


def _layer_norm(args: tuple, kwargs: dict) -> tuple | None:
    """native_layer_norm of a float32 tensor: (output like the input, mean, rstd with the normalised dims 1)."""
    if kwargs or len(args) != 5:
        return None
    x, shape = args[0], args[1]
    if not _plain(x) or x.dtype != torch.float32 or not 0 < len(shape) <= x.dim():
        return None
    stats = (*x.shape[: x.dim() - len(shape)], *([1] * len(shape)))
    return _like(x), x.new_empty(stats), x.new_empty(stats)


def _softmax_out(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """_softmax(x, dim, half_to_float=False) and _safe_softmax(x, dim) of a float tensor, in its dtype."""
    x = args[0]
    if kwargs.get("dtype") is not None or (len(args) > 2 and args[2] not in (False, None)):
        return None
    return _like(x) if _plain(x) and x.is_floating_point() else None


def _where(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """where(condition, a, b) of a boolean condition and two float tensors of one dtype: the broadcast shape,
    laid out by all three (the condition first, as torch's reference orders them)."""
    if kwargs or len(args) != 3 or not all(isinstance(t, torch.Tensor) for t in args):
        return None
    condition, a, b = args
    if condition.dtype != torch.bool or a.dtype != b.dtype or not a.is_floating_point():
        return None
    return _elementwise([condition, a, b], a.dtype, opmath=False)


def _grouped_mm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """_grouped_mm(a, b, offs, bias, out_dtype) of floating tensors of one dtype (torch's meta kernel accepts only
    bfloat16; the CPU kernel any float). The output's shape does not depend on the offsets' values: a 2-d a
    (rows, k) with a 3-d b (groups, k, n) gives (rows, n); 3-d with 2-d (groups, m, k) x (k, n) gives (m, n); 2-d
    with 2-d (k split in offs.numel() groups) gives (groups, m, n); 3-d with 3-d a batched product (groups, m, n).
    Laid out as the meta kernel lays it out (rows padded to 16 bytes on a CUDA build of torch). Other cases (a
    bias, mixed dtypes, mismatched dims): None, torch's meta kernel decides."""
    names = ("offs", "bias", "out_dtype")
    options = dict(zip(names, args[2:], strict=False)) | kwargs
    a, b, offs = args[0], args[1], options.get("offs")
    if set(options) - set(names) or options.get("bias") is not None:
        return None
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype:
        return None
    if not a.is_floating_point() or a.dim() not in (2, 3) or b.dim() not in (2, 3):
        return None
    if (a.dim() == 3 or b.dim() == 3) and a.shape[-1] != b.shape[-2]:
        return None
    if (a.dim() == 3 and b.dim() == 3) != (offs is None):
        return None
    if a.dim() == 2 and b.dim() == 2:
        sizes = [offs.shape[0], a.shape[0], b.shape[1]]
    elif a.dim() == 2:
        sizes = [a.shape[0], b.shape[-1]]
    elif b.dim() == 2:
        sizes = [a.shape[1], b.shape[1]]
    else:
        sizes = [a.shape[0], a.shape[1], b.shape[-1]]
    dtype = options.get("out_dtype") or a.dtype
    if torch.version.cuda:
        align = 16 // dtype.itemsize
        row = (sizes[-1] + align - 1) // align * align
        strides = [sizes[1] * row, row, 1] if len(sizes) == 3 else [row, 1]
        return torch.empty_strided(sizes, strides, dtype=dtype, device=a.device)
    return torch.empty(sizes, dtype=dtype, device=a.device)


DATA_DEPENDENT = (
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "bincount", "_local_scalar_dense", "repeat_interleave.Tensor", "repeat_interleave.self_Tensor",
)  # fmt: skip
"""Ops (name or name.overload) whose output's shape (or value: .item(), .tolist()) depends on their input's
values; repeat_interleave only without an output_size."""


def _data_dependent(name: str) -> Any:
    def refuse(args: tuple, kwargs: dict) -> None:
        if not any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
            return None  # a tensor with values (a CPU constant made during the forward)
        if kwargs.get("output_size") is not None:
            return None  # repeat_interleave told its output's size: no values needed
        shown = "Tensor.item() / .tolist()" if name == "_local_scalar_dense" else f"aten.{name}"
        raise MicronetError(
            f"shape-only counting runs the forward on meta tensors, which have no values, and this forward calls "
            f"{shown}, whose result depends on the values: count without shape_only (a real run). A Hugging Face "
            "mixture-of-experts model counts shape-only with the grouped_mm or batched_mm experts implementation "
            "(experts_implementation in config.json, config._experts_implementation in Python), whose shapes do not "
            "depend on the routing"
        )

    return refuse


def _attention(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) of floating
    tensors of one dtype: what torch's math path (the one it takes on meta) returns, a contiguous (..., L, Ev)
    at q's dtype, without running its dozen ops. Batch dims must match (key/value heads may divide the query's
    with enable_gqa) and a mask broadcast to (..., L, S); anything else is left to torch."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    options = dict(zip(names, args[3:], strict=False)) | kwargs
    q, k, v = args[:3]
    if set(options) - set(names) or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    if not q.is_floating_point() or not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return None
    if not 2 <= q.dim() == k.dim() == v.dim() or q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return None
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        return None
    if q.dim() >= 3 and not (q.shape[-3] == k.shape[-3] == v.shape[-3] or (
        options.get("enable_gqa") and k.shape[-3] == v.shape[-3] and q.shape[-3] % k.shape[-3] == 0
    )):  # fmt: skip
        return None
    mask = options.get("attn_mask")
    if mask is not None:
        scores = (*q.shape[:-1], k.shape[-2])
        if not isinstance(mask, torch.Tensor) or layouts.broadcast([scores, tuple(mask.shape)]) != scores:
            return None
        if options.get("is_causal"):
            return None  # torch refuses a mask with is_causal
    return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)


# A blocked log-softmax head's ops (the priced reference of counting.hints): torch's meta kernels of these run
# Python references, ~1 ms a call.


def _same_layout(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A _plain tensor's like (torch's output layout for elementwise ops on it), else None (ask torch)."""
    return _like(x, dtype) if _plain(x) else None


def _given_out(args: tuple, kwargs: dict, shape: tuple) -> torch.Tensor | None:
    out = kwargs.get("out")
    return out if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape) else None


def _clamp(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """clamp(x, min, max) by numbers of x's kind (a float bound on an integer tensor promotes: ask torch)."""
    x, bounds = args[0], args[1:]
    kinds = (int,) if not x.is_floating_point() else (int, float)
    if kwargs or x.dtype == torch.bool or not all(b is None or type(b) in kinds for b in bounds):
        return None
    return _same_layout(x)


def _compare_scalar(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return _same_layout(args[0], torch.bool) if len(args) == 2 and isinstance(args[1], (int, float)) else None


def _log_softmax(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0]
    if len(args) != 3 or args[2] or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if "out" in kwargs:
        return _given_out(args, kwargs, x.shape) if _plain(x) else None
    return None if kwargs else _same_layout(x)


def _addmm_out(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if len(args) != 3 or set(kwargs) != {"out"} or not all(isinstance(t, torch.Tensor) for t in args):
        return None
    bias, a, b = args
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or not (a.dtype == b.dtype == bias.dtype):
        return None
    return _given_out(args, kwargs, (a.shape[0], b.shape[1]))


def _gather(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if kwargs or len(args) != 3 or not isinstance(args[0], torch.Tensor) or not isinstance(args[2], torch.Tensor):
        return None
    return torch.empty(args[2].shape, dtype=args[0].dtype, device=args[0].device)


def _offset(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An integer tensor plus or minus a Python int (a bin's index offset); floating ones as shape-only does."""
    x = args[0]
    if len(args) == 2 and not kwargs and isinstance(x, torch.Tensor) and type(args[1]) is int:
        if x.dtype in (torch.int64, torch.int32):
            return _same_layout(x)
    return _pointwise(args, kwargs)


def _on_meta(make: Any) -> Any:
    """``make`` for ops whose tensors are all on meta: a tensor with values made during the forward (a CPU
    constant) is computed by torch, its values needed later."""

    def made(args: tuple, kwargs: dict) -> Any:
        for arg in args:
            for t in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    return None
        return make(args, kwargs)

    return made


def _fast_table() -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    for name in ("relu", "hardtanh", "relu6", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "gelu"):
        if hasattr(_aten, name):
            table[getattr(_aten, name).default] = _activation
        if hasattr(_aten, f"{name}_"):
            table[getattr(_aten, f"{name}_").default] = _in_place
    table[_aten.native_batch_norm.default] = _native_batch_norm
    table[_aten._native_batch_norm_legit_no_training.default] = _batch_norm_no_training
    for op in (_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.mul.Scalar,
               _aten.div.Scalar, _aten.neg.default, _aten.rsqrt.default):
        table[op] = _pointwise
    table[_aten.pow.Tensor_Scalar] = _power
    table[_aten.tril.default] = _triangle
    table[_aten.mean.dim] = _mean_dim
    table[_aten.cat.default] = _cat
    table[_aten.convolution.default] = _convolution
    for product in (_aten.mm.default, _aten.addmm.default, _aten.bmm.default):
        table[product] = _matrix_product
    table[_aten.native_layer_norm.default] = _layer_norm
    table[_aten._softmax.default] = _softmax_out
    if hasattr(_aten, "_safe_softmax"):
        table[_aten._safe_softmax.default] = _softmax_out
    table[_aten.where.self] = _where
    table[_aten.add.Tensor] = table[_aten.sub.Tensor] = _offset  # integer index offsets too
    table[_aten.clamp.default] = _clamp
    table[_aten.ge.Scalar] = _compare_scalar
    table[_aten._log_softmax.default] = table[_aten._log_softmax.out] = _log_softmax
    table[_aten.addmm.out] = _addmm_out
    table[_aten.gather.default] = _gather
    table[torch.nn.functional.scaled_dot_product_attention] = _attention  # a function: the fused call, unpriced
    if hasattr(_aten, "_grouped_mm"):
        table[_aten._grouped_mm.default] = _grouped_mm
    table = {op: _on_meta(make) for op, make in table.items()}
    for name in DATA_DEPENDENT:
        packet, _, only = name.partition(".")
        for overload in [only] if only else getattr(_aten, packet).overloads():
            if not overload.endswith("out"):
                table[getattr(getattr(_aten, packet), overload)] = _data_dependent(name)
    return table


META_FAST = _fast_table()
"""OpOverload (or a fused function the interpreter runs unpriced) -> its meta output made directly (None: ask
torch)."""
