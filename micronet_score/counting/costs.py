"""One cost function per op family: each turns an op's shape into raw (mults, adds, others) by the rule set.

Every number comes from the rule set's ``ops`` table (``cost = elements * per_element + groups * per_group``);
these functions only say what the elements and groups of a family are. A family the rule set does not price
yields ``None`` so that the interpreter lists the op as uncounted instead of counting it as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from micronet_score.ruleset import RuleSet

Counts = tuple[float, float, float]
"""Raw (mults, adds, others)."""

Bill = list[tuple[str, Counts | None]]
"""The priced pieces of one op: (family, counts), counts None where the rule set has no price for the family."""


@dataclass(frozen=True, slots=True)
class Price:
    """A rule set's price of one family, flattened for the hot path."""

    em: float
    ea: float
    eo: float
    gm: float
    ga: float
    go: float

    def __call__(self, elements: float, groups: float = 0.0) -> Counts:
        return (
            elements * self.em + groups * self.gm,
            elements * self.ea + groups * self.ga,
            elements * self.eo + groups * self.go,
        )


class Prices:
    """The op prices of a rule set, by family name."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self._by_family = {
            name: Price(
                rule.per_element.mults,
                rule.per_element.adds,
                rule.per_element.others,
                rule.per_group.mults,
                rule.per_group.adds,
                rule.per_group.others,
            )
            for name, rule in rules.ops.items()
        }

    def charge(self, bill: Bill, family: str, elements: float, groups: float = 0.0) -> Bill:
        """Append the price of ``family`` for these elements and groups (None when the family is not priced)."""
        price = self._by_family.get(family)
        bill.append((family, None if price is None else price(elements, groups)))
        return bill


def dot_product(prices: Prices, terms: float, outputs: float, density: float = 1.0) -> Bill:
    """Dot products of length n = terms * density: n mults and n - 1 adds per output (counting.py).

    A sparse weight shortens every dot product to its nonzeros (``L = k*k*cin*density``).
    """
    return prices.charge([], "dot_product", terms * density * outputs, outputs)


def bias(prices: Prices, outputs: float) -> Bill:
    """A bias (or a batch norm folded into the preceding layer) adds 1 add per output element."""
    return prices.charge([], "bias", outputs)


def elementwise(prices: Prices, family: str, elements: float) -> Bill:
    """Elementwise arithmetic, activations, comparisons, transcendentals: the family's price per output element."""
    return prices.charge([], family, elements)


def reduction(prices: Prices, family: str, inputs: float, outputs: float) -> Bill:
    """Sum, mean, max and pooling: n inputs reduced to one output cost n per_element + 1 per_group
    (sum of n: n - 1 adds; mean: n - 1 adds and 1 division; max of n: n - 1 comparisons)."""
    return prices.charge([], family, inputs, outputs)


def softmax(prices: Prices, family: str, elements: float, rows: float) -> Bill:
    """Softmax / log-softmax over rows of n: priced per element and per row (softmax: n exp, n - 1 adds, n divs)."""
    return prices.charge([], family, elements, rows)


def normalization(prices: Prices, elements: float, rows: float, affine: bool) -> Bill:
    """Layer / group / training batch norm: normalise rows (mean, variance, rsqrt, scale), plus the affine
    (1 mult + 1 add per element) when it is kept."""
    bill = prices.charge([], "normalize", elements, rows)
    if affine:
        prices.charge(bill, "norm_affine", elements)
    return bill


def batch_norm_inference(prices: Prices, elements: float, folded: bool) -> Bill:
    """Inference batch norm: folded into a preceding conv/linear it is a bias (1 add per element); elsewhere
    it is a scale and a shift (the rule set's batch_norm price per element)."""
    if folded:
        return bias(prices, elements)
    return prices.charge([], "batch_norm", elements)


def attention(
    prices: Prices, heads: float, queries: float, keys: float, dim: float, value_dim: float, masked: bool
) -> Bill:
    """Scaled dot-product attention per head: scores Q K^T (dot products of length dim), the scale applied once
    per query element, an additive mask 1 add per score, softmax over each query's keys, and the weighted sum
    of values (dot products of length keys)."""
    scores = heads * queries * keys
    bill = dot_product(prices, dim, scores)
    prices.charge(bill, "mul", heads * queries * dim)
    if masked:
        prices.charge(bill, "add", scores)
    bill += softmax(prices, "softmax", scores, heads * queries)
    bill += dot_product(prices, keys, heads * queries * value_dim)
    return bill


def lstm_cells(prices: Prices, steps: float, hidden: float) -> Bill:
    """LSTM cell updates after the gate projections: input + hidden pre-activations 1 add per gate value,
    3 sigmoid and 2 tanh per unit, c = f*c + i*g (2 mults, 1 add), h = o*tanh(c) (1 mult)."""
    units = steps * hidden
    bill = prices.charge([], "add", 4 * units)
    prices.charge(bill, "sigmoid", 3 * units)
    prices.charge(bill, "tanh", 2 * units)
    prices.charge(bill, "mul", 3 * units)
    prices.charge(bill, "add", units)
    return bill


def gru_cells(prices: Prices, steps: float, hidden: float) -> Bill:
    """GRU cell updates after the gate projections: r, z = sigmoid(x + h) (1 add each per unit), n = tanh(x_n +
    r * h_n) (1 mult, 1 add), h' = n + z * (h - n) (1 mult, 2 adds)."""
    units = steps * hidden
    bill = prices.charge([], "add", 2 * units)
    prices.charge(bill, "sigmoid", 2 * units)
    prices.charge(bill, "mul", units)
    prices.charge(bill, "add", units)
    prices.charge(bill, "tanh", units)
    prices.charge(bill, "mul", units)
    prices.charge(bill, "add", 2 * units)
    return bill


def interpolation(prices: Prices, family: str, outputs: float) -> Bill:
    """Linear, bilinear, trilinear interpolation: the family's lerps per output element (nearest is free)."""
    return prices.charge([], family, outputs)
