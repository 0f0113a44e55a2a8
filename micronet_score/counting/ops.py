"""The aten op table: which cost function prices each aten op, and with what elements and groups.

Each handler reads the op's arguments and output shapes, builds the bill with a cost function from
:mod:`costs`, and hands it to the interpreter with the operands whose widths set the multiply width.
Ops in :data:`FREE` are data movement (views, copies, lookups, creation): free. Anything else is unpriced
and reported as uncounted by the interpreter, never silently zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from micronet_score.counting import costs
from micronet_score.counting.bits import quantized_bits
from micronet_score.counting.grid import QUANTIZED

if TYPE_CHECKING:
    from micronet_score.counting.interpreter import CountingMode

aten = torch.ops.aten
Handler = Callable[["CountingMode", tuple, dict, Any], None]


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensors(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


# --- dot products -----------------------------------------------------------------------------------------


def _mm(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    a, b = args[0], args[1]
    ctx.record(ctx.weighted_dot(a.shape[-1], out.numel(), a, b), (a, b))
    ctx.linear_output(out)


def _addmm(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    a, b = args[1], args[2]  # args[0] is the bias: added at the accumulator width, it sets no multiply width
    bill = ctx.weighted_dot(a.shape[-1], out.numel(), a, b)
    if kwargs.get("beta", 1) != 0:
        bill += costs.bias(ctx.prices, out.numel())
    ctx.record(bill, (a, b))
    ctx.linear_output(out)


def _convolution(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    x, weight, bias, transposed = args[0], args[1], args[2], args[6]  # the bias sets no multiply width
    outputs = out.numel()
    if transposed:
        # Every input element meets every kernel tap of its group's output channels (weight: cin, cout/g, *k).
        terms = x.numel() * (weight.numel() // weight.shape[0]) / outputs
    else:
        terms = weight.numel() // weight.shape[0]  # cin/groups * prod(kernel)
    bill = ctx.weighted_dot(terms, outputs, weight)
    if bias is not None:
        bill += costs.bias(ctx.prices, outputs)
    ctx.record(bill, (x, weight))
    ctx.linear_output(out)


def _attention_bhle(ctx: CountingMode, args: tuple, kwargs: dict, out: Any, mask: Any) -> None:
    q, k, v = args[0], args[1], args[2]
    heads = q.numel() // (q.shape[-2] * q.shape[-1])
    bill = costs.attention(ctx.prices, heads, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], mask is not None)
    ctx.record(bill, (q, k, v))


def _sdpa_cpu_flash(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _attention_bhle(ctx, args, kwargs, out, kwargs.get("attn_mask"))


def _sdpa_flash(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _attention_bhle(ctx, args, kwargs, out, None)


def _sdpa_with_bias(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    bias = args[3] if len(args) > 3 else kwargs.get("attn_bias")
    _attention_bhle(ctx, args, kwargs, out, bias)


def _attention_blhe(ctx: CountingMode, args: tuple, kwargs: dict, out: Any, mask: Any) -> None:
    q, k, v = args[0], args[1], args[2]  # (batch, length, heads, dim)
    heads = q.numel() // (q.shape[-3] * q.shape[-1])
    bill = costs.attention(ctx.prices, heads, q.shape[-3], k.shape[-3], q.shape[-1], v.shape[-1], mask is not None)
    ctx.record(bill, (q, k, v))


def _flash_forward(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _attention_blhe(ctx, args, kwargs, out, None)


def _efficient_forward(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _attention_blhe(ctx, args, kwargs, out, args[3])


def _projection(ctx: CountingMode, x: torch.Tensor, weight: torch.Tensor, rows: slice | None = None) -> costs.Bill:
    """x @ weight[rows].T + bias: dot products of the input width, one bias add per output."""
    out_features = weight.shape[0] if rows is None else (rows.stop - rows.start)
    outputs = x.numel() // x.shape[-1] * out_features
    return ctx.weighted_dot(x.shape[-1], outputs, weight) + costs.bias(ctx.prices, outputs)


def _mha_bill(
    ctx: CountingMode,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    embed: int,
    heads: int,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    mask: Any,
    weights: bool,
) -> costs.Bill:
    """Multi-head attention: q/k/v projections, attention per head, output projection; averaged weights if asked."""
    bill: costs.Bill = []
    if q is k and k is v:
        bill += _projection(ctx, q, qkv_weight)
    else:
        for x, i in ((q, 0), (k, 1), (v, 2)):
            bill += _projection(ctx, x, qkv_weight, slice(i * embed, (i + 1) * embed))
    batch, queries, keys = q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-2], k.shape[-2]
    bill += costs.attention(ctx.prices, batch * heads, queries, keys, embed // heads, embed // heads, mask is not None)
    bill += _projection(ctx, q, proj_weight)
    if weights:
        bill += costs.reduction(ctx.prices, "mean", batch * heads * queries * keys, batch * queries * keys)
    return bill


def _native_mha(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    q, k, v, embed, heads, qkv_weight, _, proj_weight = args[:8]
    mask = args[9] if len(args) > 9 else kwargs.get("mask")
    need = args[10] if len(args) > 10 else kwargs.get("need_weights", True)
    ctx.record(_mha_bill(ctx, q, k, v, embed, heads, qkv_weight, proj_weight, mask, bool(need)), (q, qkv_weight))


def _encoder_layer(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    src, embed, heads, qkv_w, _, proj_w, _, use_gelu = args[:8]
    norm_w1, ffn_w1, ffn_w2 = args[10], args[14], args[16]
    mask = args[18] if len(args) > 18 else kwargs.get("mask")
    elements, rows = src.numel(), src.numel() // embed
    bill = _mha_bill(ctx, src, src, src, embed, heads, qkv_w, proj_w, mask, False)
    bill += costs.elementwise(ctx.prices, "add", elements)  # residual
    affine = norm_w1 is not None and ctx.keep_layer_norm_affine
    bill += costs.normalization(ctx.prices, elements, rows, affine)
    hidden = ffn_w1.shape[0]
    bill += _projection(ctx, src, ffn_w1)
    bill += costs.elementwise(ctx.prices, "gelu" if use_gelu else "relu", rows * hidden)
    bill += ctx.weighted_dot(hidden, elements, ffn_w2) + costs.bias(ctx.prices, elements)
    bill += costs.elementwise(ctx.prices, "add", elements)  # residual
    bill += costs.normalization(ctx.prices, elements, rows, affine)
    ctx.record(bill, (src, qkv_w))


def _mkldnn_rnn_layer(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    x, w_ih, w_hh = args[:3]
    mode, hidden, has_biases = args[9], args[10], args[12]
    steps = out[0].numel() // hidden  # time steps x batch
    gates = w_ih.shape[0]
    bill = ctx.weighted_dot(w_ih.shape[1], steps * gates, w_ih)
    bill += ctx.weighted_dot(w_hh.shape[1], steps * gates, w_hh)
    if has_biases:
        bill += costs.bias(ctx.prices, 2 * steps * gates)
    if gates == 4 * hidden:
        bill += costs.lstm_cells(ctx.prices, steps, hidden)
    else:  # mkldnn runs LSTM only; anything else would be priced wrongly, so it is listed instead
        ctx.unpriced(f"aten.mkldnn_rnn_layer(mode={mode})", out)
        return
    ctx.record(bill, (x, w_ih))


def fused_cell(gates_per_unit: int, cells: Callable[..., costs.Bill]) -> Handler:
    """A fused recurrent cell on precomputed gate pre-activations: the cell's work, plus both biases if given."""

    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        gates = args[0]
        bill = cells(ctx.prices, gates.numel() // gates.shape[-1], gates.shape[-1] // gates_per_unit)
        if len(args) > 3 and args[3] is not None:
            bill += costs.bias(ctx.prices, 2 * gates.numel())
        ctx.record(bill, (gates,))

    return handler


# --- elementwise ------------------------------------------------------------------------------------------


def elementwise(family: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        ctx.record(costs.elementwise(ctx.prices, family, _numel(_first(out))), _tensors(args))

    return handler


def _mul(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    if ctx.prune_product(args, out):
        return
    ctx.record(costs.elementwise(ctx.prices, "mul", out.numel()), _tensors(args))


def _elu(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    input_scale = args[3] if len(args) > 3 else kwargs.get("input_scale", 1)
    family = "elu" if input_scale == 1 else "celu"  # celu(x, a) = elu(x, a, input_scale=1/a)
    ctx.record(costs.elementwise(ctx.prices, family, out.numel()), (args[0],))


def _add(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    ctx.record(costs.elementwise(ctx.prices, "add", out.numel()), _tensors(args))
    if ctx.is_linear_output(args[0]) and isinstance(args[1], torch.Tensor) and args[1].dim() <= 1:
        ctx.linear_output(out)  # x @ W + b: the bias keeps it the output of a linear layer


# --- reductions, pooling, softmax, norms -------------------------------------------------------------------


def reduce(family: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0]
        ctx.record(costs.reduction(ctx.prices, family, x.numel(), max(_numel(_first(out)), 1)), (x,))

    return handler


def pool(family: str, spatial: int) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        x, kernel = args[0], list(args[1])
        window = math.prod(kernel) if len(kernel) > 1 else kernel[0] ** spatial
        outputs = _numel(_first(out))
        ctx.record(costs.reduction(ctx.prices, family, window * outputs, outputs), (x,))

    return handler


def adaptive(family: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0]  # windows tile the input: every input element is one term
        ctx.record(costs.reduction(ctx.prices, family, x.numel(), _numel(_first(out))), (x,))

    return handler


def soft(family: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        x, dim = args[0], args[1]
        rows = x.numel() // x.shape[dim] if x.dim() else 1
        ctx.record(costs.softmax(ctx.prices, family, x.numel(), rows), (x,))

    return handler


def _layer_norm(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    x, shape, weight, bias = args[0], args[1], args[2], args[3]
    elements = x.numel()
    affine = weight is not None and ctx.keep_layer_norm_affine
    if weight is not None and not ctx.keep_layer_norm_affine:
        ctx.drop(weight, bias)
    ctx.record(costs.normalization(ctx.prices, elements, elements // math.prod(shape), affine), (x,))


def _group_norm(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    x, weight, n, groups = args[0], args[1], args[3], args[6]
    ctx.record(costs.normalization(ctx.prices, x.numel(), n * groups, weight is not None), (x,))


def _batch_norm(
    ctx: CountingMode, x: torch.Tensor, weight: Any, bias: Any, mean: Any, var: Any, training: bool, out: Any
) -> None:
    channels = x.shape[1] if x.dim() > 1 else x.shape[0]
    if training or mean is None:
        bill = costs.normalization(ctx.prices, x.numel(), channels, weight is not None)
        ctx.record(bill, (x,))
        ctx.batch_norm(x, channels, False, (weight, bias, mean, var))
        return
    folded = ctx.folds_into_linear(x)
    ctx.record(costs.batch_norm_inference(ctx.prices, x.numel(), folded), (x,))
    ctx.batch_norm(x, channels, folded, (weight, bias, mean, var))


def _native_batch_norm(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _batch_norm(ctx, *args[:5], args[5], out)


def _batch_norm_no_training(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    _batch_norm(ctx, *args[:5], False, out)


def _batch_norm_legit(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    if len(args) == 7:  # no running stats overload
        _batch_norm(ctx, args[0], args[1], args[2], None, None, True, out)
    else:
        _batch_norm(ctx, *args[:5], args[5], out)


def interpolate(family: str) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        ctx.record(costs.interpolation(ctx.prices, family, out.numel()), (args[0],))

    return handler


# --- widths: fake quantization, copies ----------------------------------------------------------------------


def _fake_quant(qmin_at: int) -> Handler:
    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        ctx.quantized(_first(out), quantized_bits(args[qmin_at], args[qmin_at + 1]))

    return handler


def _quantize(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    """float -> quantized dtype: a conversion; the output has its dtype's width."""
    ctx.quantized(out, QUANTIZED.get(_first(out).dtype, ctx.policy.activation))


def _dequantize(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    """quantized -> float: a conversion to an exactly representable format; the values keep their width."""
    ctx.tally.conversions += 1
    if isinstance(args[0], torch.Tensor):
        ctx.keep(args[0], out)


def _packed_dot(relu: bool, dynamic: bool) -> Handler:
    """quantized::linear / conv (static: quantized input and output) and linear_dynamic (float input quantized
    inside the op: its min and max are found, 2 reductions over the input): dot products at the widths of the
    packed weight and the quantized input, one bias add per output, relu fused or not; requantization is a
    conversion."""

    def handler(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        packed = ctx.packed()
        if packed is None:
            ctx.unpriced(f"{ctx.op.overloadpacket.__qualname__} outside a torch.ao quantized module", out)
            return
        x, outputs = args[0], _numel(_first(out))
        density = packed.nonzeros / packed.numel if packed.numel else 1.0
        bill = costs.dot_product(ctx.prices, packed.terms, outputs, density)
        if packed.bias is not None:
            bill += costs.bias(ctx.prices, outputs)
        if relu:
            bill += costs.elementwise(ctx.prices, "relu", outputs)
        if dynamic:
            ctx.record(costs.reduction(ctx.prices, "max", 2 * x.numel(), 2), (x,))
            ctx.record(bill, (packed.bits,))
        else:
            ctx.record(bill, (x, packed.bits))
            ctx.tally.conversions += 1

    return handler


def _keep(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    """Lookups and rearrangements (free): the output keeps the width of what it reads."""
    source = args[0]
    if isinstance(source, torch.Tensor):
        ctx.keep(source, out)


def _embedding(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    ctx.keep(args[0], out)


def _join(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    ctx.keep_marked(args[0], out)


def _scalar(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    ctx.touch(args[0])


def keeping(handler: Handler) -> Handler:
    """A priced op whose output stays on its input's grid (relu, max pooling, max): the marks flow through."""

    def wrapped(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
        handler(ctx, args, kwargs, out)
        if ctx.marks.used:
            ctx.keep_marked(_tensors(args), out if not isinstance(out, (tuple, list)) else out[0])

    return wrapped


def _index_put(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    """index_put(x, indices, values, accumulate): a write (free); accumulating, an add per value."""
    if args[3] if len(args) > 3 else kwargs.get("accumulate", False):
        ctx.record(costs.elementwise(ctx.prices, "add", _numel(args[2])), _tensors((args[0], args[2])))


def _scatter(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    """scatter(x, dim, index, src, reduce=None): a write (free); reduce='add'/'multiply', an add or a multiply per
    index element."""
    reduce = args[4] if len(args) > 4 else kwargs.get("reduce")
    if reduce is None:
        return
    family = {"add": "add", "multiply": "mul"}.get(reduce)
    if family is None:
        ctx.unpriced(f"aten.scatter(reduce={reduce!r})", out)
    else:
        ctx.record(costs.elementwise(ctx.prices, family, _numel(args[2])), _tensors(args))


def _move(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    if ctx.marks.used:
        ctx.moved(args, out)


def _copy(ctx: CountingMode, args: tuple, kwargs: dict, out: Any) -> None:
    ctx.copied(args[0], out)


# --- the table ----------------------------------------------------------------------------------------------


def _packets(*names: str) -> list[Any]:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


TABLE: dict[Any, Handler] = {}


def _put(handler: Handler, *names: str) -> None:
    for packet in _packets(*names):
        TABLE[packet] = handler


_put(_mm, "mm", "bmm", "_int_mm")
_put(_addmm, "addmm", "baddbmm")
_put(_convolution, "convolution", "_convolution")
_put(_sdpa_cpu_flash, "_scaled_dot_product_flash_attention_for_cpu")
_put(_sdpa_flash, "_scaled_dot_product_flash_attention")
_put(
    _sdpa_with_bias,
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
_put(_flash_forward, "_flash_attention_forward")
_put(_efficient_forward, "_efficient_attention_forward")
_put(_native_mha, "_native_multi_head_attention")
_put(_encoder_layer, "_transformer_encoder_layer_fwd")
_put(_mkldnn_rnn_layer, "mkldnn_rnn_layer")
_put(fused_cell(4, costs.lstm_cells), "_thnn_fused_lstm_cell")
_put(fused_cell(3, costs.gru_cells), "_thnn_fused_gru_cell")

_put(_add, "add", "add_")
_put(elementwise("sub"), "sub", "sub_", "rsub")
_put(_mul, "mul", "mul_")
_put(elementwise("div"), "div", "div_")
_put(elementwise("addcmul"), "addcmul", "addcmul_", "addcdiv", "addcdiv_")
_put(elementwise("lerp"), "lerp", "lerp_")
_put(elementwise("sign_flip"), "neg", "neg_", "abs", "abs_")
_put(keeping(elementwise("relu")), "relu", "relu_")
_put(elementwise("relu6"), "relu6", "relu6_")
_put(elementwise("hardtanh"), "hardtanh", "hardtanh_")
_put(elementwise("leaky_relu"), "leaky_relu", "leaky_relu_")
_put(elementwise("sigmoid"), "sigmoid", "sigmoid_")
_put(elementwise("silu"), "silu", "silu_")
_put(elementwise("hardsigmoid"), "hardsigmoid", "hardsigmoid_")
_put(elementwise("hardswish"), "hardswish", "hardswish_")
_put(elementwise("gelu"), "gelu", "gelu_")
_put(elementwise("tanh"), "tanh", "tanh_")
_put(elementwise("softplus"), "softplus")
_put(_elu, "elu", "elu_")
_put(elementwise("celu"), "celu", "celu_")
_put(
    elementwise("transcendental"),
    "exp",
    "exp_",
    "exp2",
    "expm1",
    "log",
    "log_",
    "log2",
    "log10",
    "log1p",
    "sqrt",
    "sqrt_",
    "rsqrt",
    "rsqrt_",
    "erf",
    "erf_",
    "erfinv",
    "sin",
    "cos",
    "pow",
    "pow_",
    "reciprocal",
    "reciprocal_",
)
_put(
    elementwise("comparison"),
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "maximum",
    "minimum",
    "where",
    "sign",
    "masked_fill",
    "masked_fill_",
    "logical_not",
    "logical_and",
    "logical_or",
)
_put(elementwise("clamp"), "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_")
_put(elementwise("round"), "round", "floor", "ceil", "trunc")
_put(elementwise("bitwise"), "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "__and__", "__or__")
_put(elementwise("logaddexp"), "logaddexp")

_put(reduce("sum"), "sum")
_put(reduce("mean"), "mean")
_put(keeping(reduce("max")), "amax", "amin", "max", "min")
_put(reduce("max"), "argmax", "argmin")
_put(reduce("logsumexp"), "logsumexp")
_put(reduce("comparison"), "nonzero", "equal")  # every input element compared with zero / with the other
_put(pool("avg_pool", 2), "avg_pool2d")
_put(pool("avg_pool", 3), "avg_pool3d")
_put(keeping(pool("max_pool", 1)), "max_pool1d")
_put(keeping(pool("max_pool", 2)), "max_pool2d_with_indices", "max_pool2d")
_put(keeping(pool("max_pool", 3)), "max_pool3d_with_indices", "max_pool3d")
_put(adaptive("avg_pool"), "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d")
_put(keeping(adaptive("max_pool")), "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d")
_put(soft("softmax"), "_softmax", "_safe_softmax", "softmax")  # softmax: its out= overload
_put(soft("log_softmax"), "_log_softmax", "log_softmax")  # log_softmax: its out= overload
_put(_layer_norm, "native_layer_norm")
_put(_group_norm, "native_group_norm")
_put(_native_batch_norm, "native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm")
_put(_batch_norm_no_training, "_native_batch_norm_legit_no_training")
_put(_batch_norm_legit, "_native_batch_norm_legit")
_put(interpolate("upsample_linear"), "upsample_linear1d")
_put(interpolate("upsample_bilinear"), "upsample_bilinear2d")
_put(interpolate("upsample_trilinear"), "upsample_trilinear3d")

_put(
    _fake_quant(3),
    "fake_quantize_per_tensor_affine_cachemask",
    "fake_quantize_per_tensor_affine",
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
)
_put(_fake_quant(4), "fake_quantize_per_channel_affine_cachemask", "fake_quantize_per_channel_affine")
_put(_fake_quant(8), "_fused_moving_avg_obs_fq_helper", "_fused_moving_avg_obs_fq_helper_functional")
_put(_quantize, "quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic")
_put(_dequantize, "dequantize")
_put(_scalar, "_local_scalar_dense", "item")
_put(_embedding, "embedding")
_put(_join, "cat", "stack")
_put(
    _keep,
    "index",
    "index_select",
    "gather",
    "_unsafe_index",
    "constant_pad_nd",
    "repeat",
    "roll",
    "flip",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
    "masked_select",
    "diagonal",
    "movedim",
    "unfold",
    "reflection_pad2d",
    "replication_pad2d",
)
for _relu, _dynamic, _names in (
    (False, True, ("linear_dynamic",)),
    (True, True, ("linear_relu_dynamic",)),
    (False, False, ("linear", "conv1d", "conv2d", "conv3d")),
    (True, False, ("linear_relu", "conv1d_relu", "conv2d_relu", "conv3d_relu")),
):
    for _name in _names:
        if hasattr(torch.ops.quantized, _name):
            TABLE[getattr(torch.ops.quantized, _name)] = _packed_dot(_relu, _dynamic)

_put(
    _move,
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "t",
    "transpose",
    "permute",
    "expand",
    "squeeze",
    "unsqueeze",
    "select",
    "slice",
    "alias",
    "as_strided",
    "unflatten",
    "flatten",
    "detach",
    "unbind",
    "split",
    "split_with_sizes",
    "unsafe_split",
    "chunk",
    "narrow",
    "lift_fresh",
    "view_as",
    "expand_as",
)
_put(_copy, "clone", "_to_copy", "lift_fresh_copy", "_reshape_copy")
_put(_index_put, "index_put", "index_put_")
_put(_scatter, "scatter", "scatter_")

FREE = frozenset(
    _packets(
        "copy_",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "empty",
        "empty_like",
        "empty_strided",
        "full",
        "full_like",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
        "arange",
        "fill_",
        "zero_",
        "uniform_",
        "normal_",
        "index_copy",
        "index_copy_",
        "dropout",
        "native_dropout",
        "scalar_tensor",
        "im2col",
        "resize_",
        "set_",
        "detach_",
        "tril",
        "triu",
        "bernoulli_",
        "bernoulli",
        "rand",
        "randn",
        "randint",
        "_assert_async",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "is_nonzero",
        "clone_",
        "as_strided_",
        "t_",
        "transpose_",
        "squeeze_",
        "unsqueeze_",
        "_pin_memory",
        "_copy_from",
        "_copy_from_and_resize",
        "_to_dense",
        "record_stream",
        "_conj",
        "_neg_view",
        "resolve_conj",
        "resolve_neg",
    )
)
"""Data movement, lookups and tensor creation: free under the rules (no arithmetic). Not here, because they
compute: col2im (sums overlapping patches), nonzero and equal (compare every element), index_put with accumulate
and scatter with reduce (priced above, or reported as uncounted)."""
