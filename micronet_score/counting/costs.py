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
    """A rule set's price of one family, flattened for the hot path: the one place the formula
    ``elements * per_element + groups * per_group`` is applied."""

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
    """The op prices of a rule set, by family name, and its pricing policies."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.attention = rules.attention
        self.keep_layer_norm_affine = rules.folding.layer_norm_affine == "keep"
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
            if not rule.made_of
        }
        self._made_of = {name: rule.made_of for name, rule in rules.ops.items() if rule.made_of}

    def charge(self, bill: Bill, family: str, elements: float, groups: float = 0.0) -> Bill:
        """Append the price of ``family`` for these elements and groups (None when the family is not priced);
        a composite family appends the price of each of its parts."""
        parts = self._made_of.get(family)
        if parts is not None:
            for part, n in parts.items():
                self.charge(bill, part, n * elements)
            return bill
        price = self._by_family.get(family)
        bill.append((family, None if price is None else price(elements, groups)))
        return bill


def dot_product(prices: Prices, terms: float, outputs: float, density: float = 1.0) -> Bill:
    """Dot products of length n = terms * density: n mults and n - 1 adds per output (counting.py).

    A sparse weight shortens every dot product to its nonzeros (``L = k*k*cin*density``); when fewer terms than
    outputs remain, only as many outputs as terms are sums at all (the others are zero: no adds).
    """
    elements = terms * density * outputs
    return prices.charge([], "dot_product", elements, min(outputs, elements))


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
    prices: Prices,
    heads: float,
    queries: float,
    keys: float,
    dim: float,
    value_dim: float,
    masked: bool,
) -> Bill:
    """Scaled dot-product attention per head, by the rule set's attention policy: scores Q K^T (dot products of
    length dim), the scale (per score, or per query element), a mask (explicit or causal) as one add per score
    unless free, softmax over each query's keys, and the weighted sum of values (dot products of length keys)."""
    policy = prices.attention
    scores = heads * queries * keys
    bill = dot_product(prices, dim, scores)
    prices.charge(bill, "mul", scores if policy.scale == "per_score" else heads * queries * dim)
    if masked and policy.mask == "add_per_score":
        prices.charge(bill, "add", scores)
    bill += softmax(prices, "softmax", scores, heads * queries)
    bill += dot_product(prices, keys, heads * queries * value_dim)
    return bill


def cells(prices: Prices, family: str, steps: float, hidden: float) -> Bill:
    """Recurrent cell updates after the gate projections (the rule set's lstm_cell / gru_cell, made of adds,
    sigmoids, tanhs and mults per hidden unit and step)."""
    return prices.charge([], family, steps * hidden)


def interpolation(prices: Prices, family: str, outputs: float) -> Bill:
    """Linear, bilinear, trilinear, bicubic interpolation: the family's price per output element (nearest is
    free)."""
    return prices.charge([], family, outputs)


def integer_power(prices: Prices, exponent: int, elements: float) -> Bill:
    """x ** n for an integer n: square-and-multiply, floor(log2 |n|) squarings and one multiply per further set
    bit of |n|; a negative n adds the division of 1 by the result. x ** 0 and x ** 1 cost nothing."""
    n = abs(exponent)
    mults = n.bit_length() - 1 + n.bit_count() - 1 if n > 1 else 0
    bill = prices.charge([], "mul", mults * elements) if mults else []
    if exponent < 0:
        prices.charge(bill, "div", elements)
    return bill
