"""The aten op table: which cost function prices each aten op, and with what elements and groups.

A pricing handler is a pure function of one call (its inputs, its output, and facts about the operands: which
stored weight a dot product reads, noted so that its share follows the weight's representation; whether an input
is the output of a conv/linear) and the rule set's prices. It returns a :class:`Charge`: the bill, the operands
that set the multiply width, and what the call tells the storage accounting (a batch norm seen, a folded affine
dropped, a conversion). Handlers are registered with :func:`priced`, which refuses an op priced twice.

How widths flow through ops that compute nothing is its own table, :mod:`flow`. Ops in :data:`FREE` are data
movement or bookkeeping: free. Anything else is unpriced and reported as uncounted by the interpreter, never
silently zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from micronet_score.counting import costs
from micronet_score.counting.bits import quantized_bits
from micronet_score.counting.costs import Bill, Prices
from micronet_score.counting.grid import QUANTIZED
from micronet_score.counting.packed import Packed

aten = torch.ops.aten


class Facts(Protocol):
    """What a handler may know about its operands beyond their shapes (answered by the interpreter)."""

    activation: int
    """the declared activation width (a quantized output of unknown width has it)"""

    def dot(self, prices: Prices, terms: float, outputs: float, *operands: torch.Tensor) -> Bill:
        """Dot products of ``terms`` terms per output, one of ``operands`` a stored weight (activations are dense):
        priced dense; the weight's terms x outputs are noted, and the representation chosen for it after the forward
        keeps its share of them (zeros are skipped only when it is stored sparse)."""

    def follows_linear(self, tensor: Any) -> bool:
        """Whether ``tensor`` is the output of the last conv/linear (a batch norm on it folds)."""

    def packed(self) -> Packed | None:
        """The packed weight of the running torch.ao quantized module."""

    def pruned(self, args: tuple) -> bool:
        """Whether ``args[0] * args[1]`` multiplies a pruned weight by its mask (the product is the weight)."""


@dataclass(frozen=True, slots=True)
class Op:
    """One aten call as a handler sees it."""

    func: Any
    args: tuple
    kwargs: dict
    out: Any
    facts: Facts

    @property
    def name(self) -> str:
        return f"{self.func.namespace}.{self.func.overloadpacket.__name__}"

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """An argument given by position or by keyword."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)


@dataclass(frozen=True, slots=True)
class NormSeen:
    """A batch norm: its channels, whether it folds into the preceding conv/linear, its stored tensors."""

    channels: int
    folded: bool
    tensors: tuple


@dataclass(slots=True)
class Charge:
    """What one call costs and what it tells the storage accounting."""

    bill: Bill = field(default_factory=list)
    operands: tuple = ()
    """tensors (or known widths as ints) whose widest sets the multiply width"""
    more: Charge | None = None
    """a second part at other widths"""
    unpriced: str | None = None
    """the op (and why) when the rule set cannot price it: reported as uncounted"""
    linear: bool = False
    """the output is the output of a conv/linear"""
    quantized: int | None = None
    """the output holds values of this width (a quantizer); the rounding is a conversion"""
    conversions: int = 0
    norm: NormSeen | None = None
    dropped: tuple = ()
    """stored tensors folded away by the rule set"""
    pruned: bool = False
    """the output is a pruned weight (stored, not work)"""


Handler = Callable[[Op, Prices], Charge | None]

TABLE: dict[Any, Handler] = {}
"""overload packet -> pricing handler"""


def priced(*names: str, namespace: Any = aten) -> Callable[[Handler], Handler]:
    """Register a handler for these ops (those this torch has); an op priced twice is a programming error."""

    def register(handler: Handler) -> Handler:
        for name in names:
            packet = getattr(namespace, name, None)
            if packet is None:
                continue
            if packet in TABLE:
                raise ValueError(f"{name} is priced twice ({TABLE[packet].__name__} and {handler.__name__})")
            TABLE[packet] = handler
        return handler

    return register


# --- shapes -------------------------------------------------------------------------------------------------


def _numel(x: Any) -> int:
    """Elements of a tensor (a nested tensor: the sum of its components' elements)."""
    if not isinstance(x, torch.Tensor):
        return 0
    if x.is_nested:
        return int(x._nested_tensor_size().prod(-1).sum()) if x._nested_tensor_size().numel() else 0
    return x.numel()


def _last(x: torch.Tensor) -> int:
    """Size of the last dimension (a nested tensor's components share it)."""
    if x.is_nested:
        sizes = x._nested_tensor_size()
        return int(sizes[0, -1]) if sizes.numel() else 1
    return x.shape[-1]


def _sequences(x: torch.Tensor) -> list[int]:
    """Lengths of the sequences of a (batch, length, features) input; a nested tensor's own lengths."""
    if x.is_nested:
        return [int(n) for n in x._nested_tensor_size()[:, 0]]
    batch = x.numel() // (x.shape[-2] * x.shape[-1]) if x.dim() > 1 else 1
    return [x.shape[-2]] * batch


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensors(args: tuple) -> tuple:
    return tuple(a for a in args if isinstance(a, torch.Tensor))


# --- dot products ---------------------------------------------------------------------------------------------


@priced("mm", "bmm", "_int_mm")
def _mm(op: Op, prices: Prices) -> Charge:
    a, b = op.args[0], op.args[1]
    bill = op.facts.dot(prices, a.shape[-1], op.out.numel(), a, b)
    return Charge(bill, (a, b), linear=True)


def _scalings(prices: Prices, bill: Bill, beta: Any, alpha: Any, outputs: int) -> None:
    """beta * input + alpha * (a @ b): a scale other than 1 (or 0 for beta) is one multiply per output."""
    if alpha != 1:
        prices.charge(bill, "mul", outputs)
    if beta not in (0, 1):
        prices.charge(bill, "mul", outputs)


@priced("addmm", "baddbmm")
def _addmm(op: Op, prices: Prices) -> Charge:
    a, b = op.args[1], op.args[2]  # args[0] is the bias: added at the accumulator width, it sets no multiply width
    outputs = op.out.numel()
    bill = op.facts.dot(prices, a.shape[-1], outputs, a, b)
    beta, alpha = op.arg(3, "beta", 1), op.arg(4, "alpha", 1)
    if beta != 0:
        bill += costs.bias(prices, outputs)
    _scalings(prices, bill, beta, alpha, outputs)
    return Charge(bill, (a, b), linear=True)


@priced("_scaled_mm")
def _scaled_mm(op: Op, prices: Prices) -> Charge:
    """(a @ b) * scale_a * scale_b (+ bias), a and b of a narrow dtype (fp8): dot products at their widths, the
    scale one multiply per output (two when both scales vary along the output), the bias one add."""
    a, b, scale_a, scale_b = op.args[:4]
    outputs = op.out.numel()
    bill = op.facts.dot(prices, a.shape[-1], outputs, a, b)
    prices.charge(bill, "mul", outputs * (2 if scale_a.numel() > 1 and scale_b.numel() > 1 else 1))
    if op.arg(4, "bias") is not None:
        bill += costs.bias(prices, outputs)
    return Charge(bill, (a, b), linear=True)


@priced("_grouped_mm")
def _grouped_mm(op: Op, prices: Prices) -> Charge:
    """Grouped products (mixture-of-experts experts): a (tokens, k) with b (experts, k, n), offs splitting the
    tokens among experts: each routed token's row meets its expert's weight (dot products of length k); the
    other layouts: batched products per group, or k split into groups (a dot product per group and output)."""
    a, b, offs = op.args[0], op.args[1], op.arg(2, "offs")
    out = op.out
    if a.dim() == 2 and b.dim() == 2:  # k grouped: out (groups, m, n), each group's dot products of its k
        groups = out.shape[0]
        bill = costs.dot_product(prices, a.shape[-1] / groups, out.numel())
    else:
        rows = out.numel() // out.shape[-1]
        if a.dim() == 2 and offs is not None and offs.device.type != "meta" and offs.numel():
            rows = min(rows, int(offs[-1]))  # rows past the last offset belong to no expert
        bill = op.facts.dot(prices, a.shape[-1], rows * out.shape[-1], a, b)
    bias = op.arg(3, "bias")
    if bias is not None:
        bill += costs.bias(prices, out.numel())
    return Charge(bill, (a, b))


@priced("convolution", "_convolution")
def _convolution(op: Op, prices: Prices) -> Charge:
    x, weight, bias, transposed = op.args[0], op.args[1], op.args[2], op.args[6]  # the bias sets no multiply width
    outputs = op.out.numel()
    if transposed:
        # Every input element meets every kernel tap of its group's output channels (weight: cin, cout/g, *k).
        terms = x.numel() * (weight.numel() // weight.shape[0]) / outputs
    else:
        terms = weight.numel() // weight.shape[0]  # cin/groups * prod(kernel)
    bill = op.facts.dot(prices, terms, outputs, weight)
    if bias is not None:
        bill += costs.bias(prices, outputs)
    return Charge(bill, (x, weight), linear=True)


# --- attention ------------------------------------------------------------------------------------------------


def attention_charge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool, prices: Prices) -> Charge:
    """Attention on (..., length, dim) tensors; the batch and head dims of q give the heads (grouped-query
    attention shares k and v among them)."""
    heads = q.numel() // (q.shape[-2] * q.shape[-1]) if q.dim() > 1 else 1
    bill = costs.attention(prices, heads, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], masked)
    return Charge(bill, (q, k, v))


@priced("_scaled_dot_product_flash_attention_for_cpu")
def _sdpa_cpu_flash(op: Op, prices: Prices) -> Charge:
    masked = op.arg(5, "attn_mask") is not None or bool(op.arg(4, "is_causal", False))
    return attention_charge(op.args[0], op.args[1], op.args[2], masked, prices)


@priced("_scaled_dot_product_flash_attention")
def _sdpa_flash(op: Op, prices: Prices) -> Charge:
    return attention_charge(op.args[0], op.args[1], op.args[2], bool(op.arg(4, "is_causal", False)), prices)


@priced("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
def _sdpa_with_bias(op: Op, prices: Prices) -> Charge:
    masked = op.arg(3, "attn_bias") is not None or bool(op.arg(6, "is_causal", False))
    return attention_charge(op.args[0], op.args[1], op.args[2], masked, prices)


@priced("_scaled_dot_product_fused_attention_overrideable")
def _sdpa_overrideable(op: Op, prices: Prices) -> Charge:
    masked = op.arg(3, "attn_bias") is not None or bool(op.arg(5, "is_causal", False))
    return attention_charge(op.args[0], op.args[1], op.args[2], masked, prices)


def _blhe(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2)  # (batch, length, heads, dim) -> (batch, heads, length, dim): shapes only


@priced("_flash_attention_forward")
def _flash_forward(op: Op, prices: Prices) -> Charge:
    q, k, v = (_blhe(t) for t in op.args[:3])
    return attention_charge(q, k, v, bool(op.arg(8, "is_causal", False)), prices)


@priced("_efficient_attention_forward")
def _efficient_forward(op: Op, prices: Prices) -> Charge:
    q, k, v = (_blhe(t) for t in op.args[:3])
    masked = op.args[3] is not None or bool(op.arg(9, "custom_mask_type", 0))
    return attention_charge(q, k, v, masked, prices)


def _projection(prices: Prices, facts: Facts, x: torch.Tensor, weight: torch.Tensor, features: int) -> Bill:
    """x @ weight.T + bias with ``features`` outputs per row: dot products of the input width, one bias add per
    output."""
    outputs = _numel(x) // _last(x) * features
    return facts.dot(prices, _last(x), outputs, weight) + costs.bias(prices, outputs)


def mha_bill(
    prices: Prices,
    facts: Facts,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    embed: int,
    heads: int,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    masked: bool,
    weights: bool,
) -> Bill:
    """Multi-head attention: q/k/v projections, attention per head and sequence, output projection; averaged
    weights if asked. The attention is priced by the rule set's policy, as every attention is (its kernels
    scale q, not the scores, but one attention has one price)."""
    bill: Bill = []
    if q is k and k is v:
        bill += _projection(prices, facts, q, qkv_weight, 3 * embed)
    else:
        for x in (q, k, v):
            bill += _projection(prices, facts, x, qkv_weight, embed)
    dim = embed // heads
    for queries, keys in zip(_sequences(q), _sequences(k), strict=False):
        bill += costs.attention(prices, heads, queries, keys, dim, dim, masked)
        if weights:
            bill += costs.reduction(prices, "mean", heads * queries * keys, queries * keys)
    bill += _projection(prices, facts, q, proj_weight, embed)
    return bill


@priced("_native_multi_head_attention")
def _native_mha(op: Op, prices: Prices) -> Charge:
    q, k, v, embed, heads, qkv_weight, _, proj_weight = op.args[:8]
    masked = op.arg(9, "mask") is not None
    need = bool(op.arg(10, "need_weights", True))
    return Charge(mha_bill(prices, op.facts, q, k, v, embed, heads, qkv_weight, proj_weight, masked, need),
                  (q, qkv_weight))


@priced("_transformer_encoder_layer_fwd")
def _encoder_layer(op: Op, prices: Prices) -> Charge:
    """The fused encoder layer (nn.TransformerEncoderLayer's fast path), on a padded or a nested input."""
    src, embed, heads, qkv_w, _, proj_w, _, use_gelu = op.args[:8]
    norm_w1, ffn_w1, ffn_w2 = op.args[10], op.args[14], op.args[16]
    masked = op.arg(18, "mask") is not None
    elements = _numel(src)
    rows = elements // embed
    bill = mha_bill(prices, op.facts, src, src, src, embed, heads, qkv_w, proj_w, masked, False)
    bill += costs.elementwise(prices, "add", elements)  # residual
    affine = norm_w1 is not None and prices.keep_layer_norm_affine
    bill += costs.normalization(prices, elements, rows, affine)
    hidden = ffn_w1.shape[0]
    bill += _projection(prices, op.facts, src, ffn_w1, hidden)
    bill += costs.elementwise(prices, "gelu" if use_gelu else "relu", rows * hidden)
    bill += op.facts.dot(prices, hidden, elements, ffn_w2) + costs.bias(prices, elements)
    bill += costs.elementwise(prices, "add", elements)  # residual
    bill += costs.normalization(prices, elements, rows, affine)
    return Charge(bill, (src, qkv_w))


# --- recurrent layers -------------------------------------------------------------------------------------------


@priced("mkldnn_rnn_layer")
def _mkldnn_rnn_layer(op: Op, prices: Prices) -> Charge:
    x, w_ih, w_hh = op.args[:3]
    mode, hidden, has_biases = op.args[9], op.args[10], op.args[12]
    steps = op.out[0].numel() // hidden  # time steps x batch
    gates = w_ih.shape[0]
    if gates != 4 * hidden:  # mkldnn runs LSTM only; anything else would be priced wrongly, so it is listed instead
        return Charge(unpriced=f"aten.mkldnn_rnn_layer(mode={mode})")
    bill = op.facts.dot(prices, w_ih.shape[1], steps * gates, w_ih)
    bill += op.facts.dot(prices, w_hh.shape[1], steps * gates, w_hh)
    if has_biases:
        bill += costs.bias(prices, 2 * steps * gates)
    bill += costs.cells(prices, "lstm_cell", steps, hidden)
    return Charge(bill, (x, w_ih))


def fused_cell(family: str, gates_per_unit: int) -> Handler:
    """A fused recurrent cell on precomputed gate pre-activations: the cell's work, plus both biases if given."""

    def handler(op: Op, prices: Prices) -> Charge:
        gates = op.args[0]
        bill = costs.cells(prices, family, gates.numel() // gates.shape[-1], gates.shape[-1] // gates_per_unit)
        if len(op.args) > 3 and op.args[3] is not None:
            bill += costs.bias(prices, 2 * gates.numel())
        return Charge(bill, (gates,))

    handler.__name__ = f"fused_{family}"
    return handler


priced("_thnn_fused_lstm_cell")(fused_cell("lstm_cell", 4))
priced("_thnn_fused_gru_cell")(fused_cell("gru_cell", 3))


# --- elementwise ------------------------------------------------------------------------------------------------


def elementwise(family: str) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        return Charge(costs.elementwise(prices, family, _numel(_first(op.out))), _tensors(op.args))

    handler.__name__ = f"elementwise_{family}"
    return handler


@priced("mul", "mul_")
def _mul(op: Op, prices: Prices) -> Charge:
    if op.facts.pruned(op.args):
        return Charge(pruned=True)
    return Charge(costs.elementwise(prices, "mul", op.out.numel()), _tensors(op.args))


@priced("elu", "elu_")
def _elu(op: Op, prices: Prices) -> Charge:
    family = "elu" if op.arg(3, "input_scale", 1) == 1 else "celu"  # celu(x, a) = elu(x, a, input_scale=1/a)
    return Charge(costs.elementwise(prices, family, op.out.numel()), (op.args[0],))


@priced("add", "add_")
def _add(op: Op, prices: Prices) -> Charge:
    bill = costs.elementwise(prices, "add", _numel(op.out))
    alpha = op.arg(2, "alpha", 1)
    if alpha != 1:
        prices.charge(bill, "mul", _numel(op.out))
    other = op.args[1]
    # x @ W + b: the bias keeps it the output of a linear layer
    linear = op.facts.follows_linear(op.args[0]) and isinstance(other, torch.Tensor) and other.dim() <= 1
    return Charge(bill, _tensors(op.args), linear=linear)


def _integer(value: Any) -> int | None:
    """A Python or 0-dim exponent that is a whole number."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else None


@priced("pow", "pow_")
def _pow(op: Op, prices: Prices) -> Charge:
    """x ** n: an integer n as multiplies (square-and-multiply), 0.5 as a sqrt, anything else transcendental."""
    base, exponent = op.args[0], op.args[1]
    elements = _numel(op.out)
    n = _integer(exponent) if isinstance(base, torch.Tensor) else None
    if n is not None:
        return Charge(costs.integer_power(prices, n, elements), (base,))
    return Charge(costs.elementwise(prices, "transcendental", elements), _tensors(op.args))


@priced("floor_divide", "floor_divide_")
def _floor_divide(op: Op, prices: Prices) -> Charge:
    return Charge(costs.elementwise(prices, "floor_divide", _numel(op.out)), _tensors(op.args))


for _family, _names in {
    "sub": ("sub", "sub_", "rsub"),
    "div": ("div", "div_"),
    "addcmul": ("addcmul", "addcmul_", "addcdiv", "addcdiv_"),
    "lerp": ("lerp", "lerp_"),
    "sign_flip": ("neg", "neg_", "abs", "abs_"),
    "relu": ("relu", "relu_"),
    "relu6": ("relu6", "relu6_"),
    "hardtanh": ("hardtanh", "hardtanh_"),
    "leaky_relu": ("leaky_relu", "leaky_relu_"),
    "sigmoid": ("sigmoid", "sigmoid_"),
    "silu": ("silu", "silu_"),
    "hardsigmoid": ("hardsigmoid", "hardsigmoid_"),
    "hardswish": ("hardswish", "hardswish_"),
    "gelu": ("gelu", "gelu_"),
    "tanh": ("tanh", "tanh_"),
    "softplus": ("softplus",),
    "celu": ("celu", "celu_"),
    "transcendental": (
        "exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log10", "log1p", "sqrt", "sqrt_", "rsqrt",
        "rsqrt_", "erf", "erf_", "erfinv", "sin", "cos", "reciprocal", "reciprocal_",
    ),
    "comparison": (
        "eq", "ne", "lt", "le", "gt", "ge", "maximum", "minimum", "where", "sign", "masked_fill", "masked_fill_",
        "logical_not", "logical_and", "logical_or",
    ),
    "clamp": ("clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"),
    "round": ("round", "floor", "ceil", "trunc"),
    "bitwise": ("bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "__and__", "__or__"),
    "logaddexp": ("logaddexp",),
}.items():  # fmt: skip
    priced(*_names)(elementwise(_family))


# --- reductions, sorting, pooling, softmax, norms -------------------------------------------------------------


def reduce(family: str) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        x = op.args[0]
        return Charge(costs.reduction(prices, family, x.numel(), max(_numel(_first(op.out)), 1)), (x,))

    handler.__name__ = f"reduce_{family}"
    return handler


priced("sum")(reduce("sum"))
priced("mean")(reduce("mean"))
priced("amax", "amin", "max", "min", "argmax", "argmin")(reduce("max"))
priced("logsumexp")(reduce("logsumexp"))
# every input element compared with zero / with the other; all / any test every element
priced("nonzero", "equal", "all", "any")(reduce("comparison"))


def _rows(x: torch.Tensor, dim: int) -> tuple[int, int]:
    """(rows, n) of x reduced along dim."""
    if x.dim() == 0:
        return 1, 1
    n = x.shape[dim]
    return (x.numel() // n if n else 0), n


@priced("aminmax")
def _aminmax(op: Op, prices: Prices) -> Charge:
    """min and max together: 2 (n - 1) comparisons per output."""
    x, outputs = op.args[0], max(_numel(op.out[0]), 1)
    return Charge(costs.reduction(prices, "max", 2 * x.numel(), 2 * outputs), (x,))


@priced("cumsum", "cumsum_")
def _cumsum(op: Op, prices: Prices) -> Charge:
    x = op.args[0]
    rows, n = _rows(x, op.arg(1, "dim", 0))
    return Charge(costs.reduction(prices, "prefix_sum", rows * n, rows), (x,))


@priced("topk")
def _topk(op: Op, prices: Prices) -> Charge:
    x, k = op.args[0], op.args[1]
    rows, n = _rows(x, op.arg(2, "dim", -1))
    return Charge(costs.reduction(prices, "top_k", rows * k * n, rows * k), (x,))


@priced("sort", "argsort")
def _sort(op: Op, prices: Prices) -> Charge:
    x = op.args[0]
    rows, n = _rows(x, op.arg(1, "dim", -1))  # the stable overloads take dim by keyword
    return Charge(costs.elementwise(prices, "sort", rows * n * math.ceil(math.log2(n)) if n > 1 else 0), (x,))


@priced("histc")
def _histc(op: Op, prices: Prices) -> Charge:
    x = op.args[0]
    return Charge(costs.elementwise(prices, "histogram", x.numel()), (x,))


@priced("index_add", "index_add_")
def _index_add(op: Op, prices: Prices) -> Charge:
    """index_add(x, dim, index, source, alpha): one add per source element (a multiply too when alpha != 1)."""
    source = op.args[3]
    bill = costs.elementwise(prices, "add", source.numel())
    if op.arg(4, "alpha", 1) != 1:
        prices.charge(bill, "mul", source.numel())
    return Charge(bill, (op.args[0], source))


@priced("scatter_add", "scatter_add_")
def _scatter_add(op: Op, prices: Prices) -> Charge:
    return Charge(costs.elementwise(prices, "add", op.args[2].numel()), (op.args[0], op.args[3]))


@priced("index_put", "index_put_")
def _index_put(op: Op, prices: Prices) -> Charge | None:
    """index_put(x, indices, values, accumulate): a write (free); accumulating, an add per value."""
    if not op.arg(3, "accumulate", False):
        return None
    return Charge(costs.elementwise(prices, "add", _numel(op.args[2])), _tensors((op.args[0], op.args[2])))


@priced("scatter", "scatter_")
def _scatter(op: Op, prices: Prices) -> Charge | None:
    """scatter(x, dim, index, src, reduce=None): a write (free); reduce='add'/'multiply', an add or a multiply per
    index element."""
    reduce = op.arg(4, "reduce")
    if reduce is None:
        return None
    family = {"add": "add", "multiply": "mul"}.get(reduce)
    if family is None:
        return Charge(unpriced=f"aten.scatter(reduce={reduce!r})")
    return Charge(costs.elementwise(prices, family, _numel(op.args[2])), _tensors(op.args))


def pool(family: str, spatial: int) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        x, kernel = op.args[0], list(op.args[1])
        window = math.prod(kernel) if len(kernel) > 1 else kernel[0] ** spatial
        outputs = _numel(_first(op.out))
        return Charge(costs.reduction(prices, family, window * outputs, outputs), (x,))

    handler.__name__ = f"pool_{family}"
    return handler


priced("avg_pool2d")(pool("avg_pool", 2))
priced("avg_pool3d")(pool("avg_pool", 3))
priced("max_pool1d")(pool("max_pool", 1))
priced("max_pool2d_with_indices", "max_pool2d")(pool("max_pool", 2))
priced("max_pool3d_with_indices", "max_pool3d")(pool("max_pool", 3))


def adaptive_terms(inputs: int, outputs: int) -> int:
    """Sum of the window lengths of adaptive pooling along one axis: window i spans
    [floor(i * inputs / outputs), ceil((i + 1) * inputs / outputs))."""
    return sum(-(-(i + 1) * inputs // outputs) - (i * inputs // outputs) for i in range(outputs))


def adaptive(family: str) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        x, out = op.args[0], _first(op.out)
        spatial = len(op.args[1])
        lead = math.prod(out.shape[: out.dim() - spatial])
        terms = lead * math.prod(
            adaptive_terms(i, o) for i, o in zip(x.shape[-spatial:], out.shape[-spatial:], strict=True)
        )
        return Charge(costs.reduction(prices, family, terms, out.numel()), (x,))

    handler.__name__ = f"adaptive_{family}"
    return handler


priced("_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d")(adaptive("avg_pool"))
priced("adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d")(adaptive("max_pool"))


def soft(family: str) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        x, dim = op.args[0], op.args[1]
        rows = x.numel() // x.shape[dim] if x.dim() else 1
        return Charge(costs.softmax(prices, family, x.numel(), rows), (x,))

    handler.__name__ = f"soft_{family}"
    return handler


priced("_softmax", "_safe_softmax", "softmax")(soft("softmax"))  # softmax: its out= overload
priced("_log_softmax", "log_softmax")(soft("log_softmax"))  # log_softmax: its out= overload


@priced("native_layer_norm")
def _layer_norm(op: Op, prices: Prices) -> Charge:
    x, shape, weight, bias = op.args[0], op.args[1], op.args[2], op.args[3]
    elements = x.numel()
    affine = weight is not None and prices.keep_layer_norm_affine
    dropped = (weight, bias) if weight is not None and not prices.keep_layer_norm_affine else ()
    return Charge(costs.normalization(prices, elements, elements // math.prod(shape), affine), (x,), dropped=dropped)


@priced("native_group_norm")
def _group_norm(op: Op, prices: Prices) -> Charge:
    x, weight, n, groups = op.args[0], op.args[1], op.args[3], op.args[6]
    return Charge(costs.normalization(prices, x.numel(), n * groups, weight is not None), (x,))


def _batch_norm(op: Op, prices: Prices, x: torch.Tensor, tensors: tuple, training: bool) -> Charge:
    channels = x.shape[1] if x.dim() > 1 else x.shape[0]
    weight, mean = tensors[0], tensors[2]
    if training or mean is None:
        bill = costs.normalization(prices, x.numel(), channels, weight is not None)
        return Charge(bill, (x,), norm=NormSeen(channels, False, tensors))
    folded = prices.rules.folding.batch_norm_after_linear == "bias" and op.facts.follows_linear(x)
    return Charge(costs.batch_norm_inference(prices, x.numel(), folded), (x,), norm=NormSeen(channels, folded, tensors))


@priced("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm")
def _native_batch_norm(op: Op, prices: Prices) -> Charge:
    return _batch_norm(op, prices, op.args[0], tuple(op.args[1:5]), bool(op.args[5]))


@priced("_native_batch_norm_legit_no_training")
def _batch_norm_no_training(op: Op, prices: Prices) -> Charge:
    return _batch_norm(op, prices, op.args[0], tuple(op.args[1:5]), False)


@priced("_native_batch_norm_legit")
def _batch_norm_legit(op: Op, prices: Prices) -> Charge:
    if len(op.args) == 7:  # no running stats overload
        return _batch_norm(op, prices, op.args[0], (op.args[1], op.args[2], None, None), True)
    return _batch_norm(op, prices, op.args[0], tuple(op.args[1:5]), bool(op.args[5]))


# --- interpolation ----------------------------------------------------------------------------------------------


def interpolate(family: str) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        return Charge(costs.interpolation(prices, family, op.out.numel()), (op.args[0],))

    handler.__name__ = f"interpolate_{family}"
    return handler


priced("upsample_linear1d")(interpolate("upsample_linear"))
priced("upsample_bilinear2d")(interpolate("upsample_bilinear"))
priced("upsample_trilinear3d")(interpolate("upsample_trilinear"))
priced("upsample_bicubic2d")(interpolate("upsample_bicubic"))


def antialias_taps(inputs: int, outputs: int) -> int:
    """Taps of an antialiased linear (triangle) filter along one axis, summed over the outputs: the filter's
    support (1, widened by the downsampling factor) around each output's centre, clipped to the input."""
    scale = inputs / outputs
    support = scale if scale >= 1.0 else 1.0
    taps = 0
    for i in range(outputs):
        centre = scale * (i + 0.5)
        first = max(int(centre - support + 0.5), 0)
        taps += min(int(centre + support + 0.5), inputs) - first
    return taps


@priced("_upsample_bilinear2d_aa")
def _bilinear_aa(op: Op, prices: Prices) -> Charge:
    """Antialiased bilinear resize: a weighted sum along the width (rows of the input height), then along the
    height; the weights depend on shapes only."""
    x, out = op.args[0], op.out
    h_in, w_in, h_out, w_out = x.shape[-2], x.shape[-1], out.shape[-2], out.shape[-1]
    lead = x.numel() // (h_in * w_in) if h_in * w_in else 0
    bill = costs.dot_product(prices, antialias_taps(w_in, w_out) / w_out, lead * h_in * w_out)
    bill += costs.dot_product(prices, antialias_taps(h_in, h_out) / h_out, lead * h_out * w_out)
    return Charge(bill, (x,))


# --- widths: fake quantization, quantized ops ------------------------------------------------------------------


def _fake_quant(qmin_at: int) -> Handler:
    def handler(op: Op, prices: Prices) -> Charge:
        return Charge(quantized=quantized_bits(op.args[qmin_at], op.args[qmin_at + 1]))

    handler.__name__ = f"fake_quant_{qmin_at}"
    return handler


priced("fake_quantize_per_tensor_affine_cachemask", "fake_quantize_per_tensor_affine")(_fake_quant(3))
priced("_fake_quantize_per_tensor_affine_cachemask_tensor_qparams")(_fake_quant(4))
priced("fake_quantize_per_channel_affine_cachemask", "fake_quantize_per_channel_affine")(_fake_quant(4))
priced("_fused_moving_avg_obs_fq_helper", "_fused_moving_avg_obs_fq_helper_functional")(_fake_quant(8))


@priced("quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic")
def _quantize(op: Op, prices: Prices) -> Charge:
    """float -> quantized dtype: a conversion; the output has its dtype's width."""
    return Charge(quantized=QUANTIZED.get(_first(op.out).dtype, op.facts.activation))


@priced("dequantize")
def _dequantize(op: Op, prices: Prices) -> Charge:
    """quantized -> float: a conversion to an exactly representable format (the values keep their width)."""
    return Charge(conversions=1)


def _packed_dot(relu: bool, dynamic: bool) -> Handler:
    """quantized::linear / conv (static: quantized input and output) and linear_dynamic (float input quantized
    inside the op: its min and max are found, 2 reductions over the input): dot products at the widths of the
    packed weight and the quantized input, one bias add per output, relu fused or not; requantization is a
    conversion."""

    def handler(op: Op, prices: Prices) -> Charge:
        packed = op.facts.packed()
        if packed is None:
            return Charge(unpriced=f"{op.func.overloadpacket.__qualname__} outside a torch.ao quantized module")
        x, outputs = op.args[0], _numel(_first(op.out))
        density = packed.nonzeros / packed.numel if packed.numel else 1.0
        bill = costs.dot_product(prices, packed.terms, outputs, density)
        if packed.bias is not None:
            bill += costs.bias(prices, outputs)
        if relu:
            bill += costs.elementwise(prices, "relu", outputs)
        if dynamic:
            return Charge(costs.reduction(prices, "max", 2 * x.numel(), 2), (x,), more=Charge(bill, (packed.bits,)))
        return Charge(bill, (x, packed.bits), conversions=1)

    handler.__name__ = f"packed_dot{'_relu' if relu else ''}{'_dynamic' if dynamic else ''}"
    return handler


for _relu, _dynamic, _names in (
    (False, True, ("linear_dynamic",)),
    (True, True, ("linear_relu_dynamic",)),
    (False, False, ("linear", "conv1d", "conv2d", "conv3d")),
    (True, False, ("linear_relu", "conv1d_relu", "conv2d_relu", "conv3d_relu")),
):
    priced(*_names, namespace=torch.ops.quantized)(_packed_dot(_relu, _dynamic))


# --- free ---------------------------------------------------------------------------------------------------------


def _packets(*names: str, namespace: Any = aten) -> list[Any]:
    return [getattr(namespace, n) for n in names if hasattr(namespace, n)]


FREE = frozenset(
    _packets(
        "copy_", "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "empty_strided", "full",
        "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "arange", "fill_",
        "zero_", "uniform_", "normal_", "index_copy", "index_copy_", "dropout", "native_dropout", "scalar_tensor",
        "im2col", "resize_", "set_", "detach_", "tril", "triu", "bernoulli_", "bernoulli", "rand", "randn",
        "randint", "sym_size", "sym_stride", "sym_numel", "is_nonzero", "clone_", "as_strided_", "t_",
        "transpose_", "squeeze_", "unsqueeze_", "_pin_memory", "_copy_from", "_copy_from_and_resize", "_to_dense",
        "record_stream", "_conj", "_neg_view", "resolve_conj", "resolve_neg", "one_hot",
        # assertions and shape bookkeeping of exported programs
        "_assert_async", "_assert_scalar", "_assert_tensor_metadata", "_functional_assert_async",
        "_functional_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
        # nested tensors: layouts of the same values
        "_nested_tensor_from_mask", "_nested_tensor_from_mask_left_aligned", "to_padded_tensor",
        "_nested_from_padded", "_nested_from_padded_and_nested_example", "_nested_tensor_size",
        "_nested_tensor_strides", "_nested_tensor_storage_offsets", "_nested_view_from_buffer",
    )  # fmt: skip
    + _packets("_record_function_enter", "_record_function_enter_new", "_record_function_exit",
               namespace=torch.ops.profiler)
)
"""Data movement, lookups, tensor creation and bookkeeping (profiler markers, exported programs' assertions):
free under the rules (no arithmetic). Not here, because they compute: col2im (sums overlapping patches),
nonzero, equal, all and any (test every element), index_put with accumulate and scatter with reduce (priced
above, or reported as uncounted)."""

_both = FREE & TABLE.keys()
assert not _both, f"ops both free and priced: {_both}"
