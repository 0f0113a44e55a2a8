"""Shape-only counting: the forward runs on a meta copy of the model (no values computed), priced with the real
model's widths, densities and storage.

The copy shares nothing with the real model: its modules are deep copies whose parameters and buffers are meta
tensors of the same shapes, dtypes and requires_grad. Each meta tensor's storage maps back to its real tensor's
storage, so the interpreter finds the real weight table (nonzeros counted from the real values, widths, pruning
masks) under the meta keys, and what it learns about storage (tensors read, folded away) is translated back.
The real model is only read: its values, attributes and version counters stay as they were.

A forward whose control flow depends on tensor values (``if x.sum() > 0``, ``.item()``, ``.tolist()``,
``nonzero``) cannot run on meta tensors: :class:`MicronetError` says so, and to count without shape_only.
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
# torch's meta kernels for batch norm and activations run its Python reference implementations (0.3 to 0.9 ms
# an op, more than the real CPU op on small inputs). For these ops the output is exactly an empty tensor like
# the input, so shape-only counting makes it directly; any case not listed exactly falls back to torch (None).


def _like(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (itself a Python reference on meta, ~20 us) for contiguous tensors, in ~1 us."""
    if x.is_contiguous():
        return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _like_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0]
    return _like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def _in_place(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0]
    return x if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def _batch_norm_outputs(x: Any, weight: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 2:
        return None
    if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32):
        return None
    channels = x.shape[1]
    return _like(x), x.new_empty((channels,)), x.new_empty((channels,))


def _native_batch_norm(args: tuple, kwargs: dict) -> tuple | None:
    return _batch_norm_outputs(args[0], args[1]) if len(args) >= 8 and not kwargs else None


def _batch_norm_no_training(args: tuple, kwargs: dict) -> tuple | None:
    return _batch_norm_outputs(args[0], args[1]) if len(args) >= 7 and not kwargs else None


def _pointwise(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Floating elementwise arithmetic of row-major tensors on one device (and numbers): the broadcast shape at
    the promoted dtype (torch.result_type), contiguous, as torch's kernels make it for such inputs."""
    if len(args) > 2 or set(kwargs) - {"alpha"}:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(isinstance(a, bool) or not isinstance(a, (torch.Tensor, int, float)) for a in args):
        return None
    device = tensors[0].device
    if any(not t.is_floating_point() or not _row_major(t) or t.device != device for t in tensors):
        return None
    dtype = torch.result_type(args[0], args[1]) if len(args) == 2 else tensors[0].dtype
    return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=dtype, device=device)


def _triangle(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """tril(x, diagonal) of a contiguous tensor: like its input, whatever its dtype."""
    x = args[0]
    return _like(x) if isinstance(x, torch.Tensor) and x.is_contiguous() and x.dim() >= 2 else None


def _row_major(t: torch.Tensor) -> bool:
    """Strides that do not grow along the dims (contiguous, or a slice of a contiguous tensor): torch lays the
    output of elementwise ops on such inputs out contiguously."""
    strides = [st for n, st in zip(t.shape, t.stride(), strict=True) if n > 1]
    return all(a >= b for a, b in zip(strides, strides[1:], strict=False))


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
    """cat of contiguous floating tensors of one dtype, rank and device along one dim."""
    if kwargs or not args or len(args) > 2 or not isinstance(args[0], (list, tuple)) or not args[0]:
        return None
    tensors, dim = args[0], args[1] if len(args) == 2 else 0
    first = tensors[0]
    if not all(
        isinstance(t, torch.Tensor) and t.dtype == first.dtype and t.dim() == first.dim() > 0
        and t.device == first.device and t.is_floating_point() and t.is_contiguous()
        for t in tensors
    ):
        return None
    dim %= first.dim()
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1 :] != first.shape[dim + 1 :] for t in tensors):
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device=first.device)


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
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not 0 < len(shape) <= x.dim():
        return None
    stats = (*x.shape[: x.dim() - len(shape)], *([1] * len(shape)))
    return _like(x), x.new_empty(stats), x.new_empty(stats)


def _softmax_out(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """_softmax(x, dim, half_to_float=False) and _safe_softmax(x, dim) of a float tensor, in its dtype."""
    x = args[0]
    if kwargs.get("dtype") is not None or (len(args) > 2 and args[2] not in (False, None)):
        return None
    return _like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None


def _where(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """where(condition, a, b) of a boolean condition and two float tensors of one dtype: the broadcast shape."""
    if kwargs or len(args) != 3 or not all(isinstance(t, torch.Tensor) for t in args):
        return None
    condition, a, b = args
    if condition.dtype != torch.bool or a.dtype != b.dtype or not a.is_floating_point():
        return None
    return torch.empty(torch.broadcast_shapes(condition.shape, a.shape, b.shape), dtype=a.dtype, device=a.device)


def _fast_table() -> dict[Any, Any]:
    table: dict[Any, Any] = {}
    for name in ("relu", "hardtanh", "relu6", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "gelu"):
        if hasattr(_aten, name):
            table[getattr(_aten, name).default] = _like_input
        if hasattr(_aten, f"{name}_"):
            table[getattr(_aten, f"{name}_").default] = _in_place
    table[_aten.native_batch_norm.default] = _native_batch_norm
    table[_aten._native_batch_norm_legit_no_training.default] = _batch_norm_no_training
    for op in (_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.mul.Scalar,
               _aten.div.Scalar, _aten.pow.Tensor_Scalar, _aten.neg.default, _aten.rsqrt.default):
        table[op] = _pointwise
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
    return table


META_FAST = _fast_table()
"""OpOverload -> its meta output made directly (None: ask torch)."""
