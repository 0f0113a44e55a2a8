"""How a stored tensor is represented (rules §1.3), one rule for ``count`` and ``audit``.

Three legal representations of a tensor of n values, b bits each, z of them zero:

* ``dense``: every value, n*b bits (plus a mask of n bits when the rule set charges one for every tensor);
* ``masked``: the nonzeros plus a 1-bit mask of the full shape, (n - z)*b + n bits; its dot products skip the
  zeros (density (n - z)/n);
* ``block``: every value of the blocks that hold a nonzero plus one bit per block (when the rule set allows block
  sparsity); its dot products skip the all-zero blocks only.

The organizers' counting code took sparsity as the entrant declared it; a tool that measures zeros must not charge
a full-shape mask for a handful of accidental zeros (normal initialisation yields exact zeros; an embedding's
padding row is zero), since an entrant would store such a tensor dense. So by default (``auto``) each tensor gets
the representation with the smallest effect on the score: its storage over the track's baseline storage plus the
operations of its dot products over the baseline operations. Without a track there is no score, and the choice is
the smallest storage. A user can force one representation for every tensor that has zeros (``dense``, ``masked``,
``block``); a tensor without zeros is always dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from micronet_score.counting.blocks import Blocks, candidates, tile
from micronet_score.errors import MicronetError
from micronet_score.ruleset import MaskPolicy, RuleSet

Kind = Literal["dense", "masked", "block"]
Choice = Literal["auto", "dense", "masked", "block"]
CHOICES: tuple[str, ...] = ("auto", "dense", "masked", "block")


@dataclass(frozen=True, slots=True)
class Representation:
    """One way of storing a tensor: the values it stores, its mask, and the share of dot-product terms computed."""

    kind: Kind
    values: int
    mask_bits: float
    density: float
    blocks: Blocks | None = None

    def bits(self, width: int) -> float:
        return self.values * width + self.mask_bits

    @property
    def label(self) -> str:
        """``dense``, ``masked`` or ``block RxC``."""
        return f"block {self.blocks.shape[0]}x{self.blocks.shape[1]}" if self.blocks is not None else self.kind


@dataclass(frozen=True, slots=True)
class Weights:
    """What one 32-bit-equivalent of storage and one of operations (per sample) are worth in the choice."""

    storage: float = 1.0
    operations: float = 0.0

    @classmethod
    def of(cls, rules: RuleSet, track: str | None) -> Weights:
        """The score's: 1 / baseline storage and 1 / baseline operations; without a track, storage alone."""
        if track is None:
            return cls()
        spec = rules.tracks[track]
        return cls(1.0 / spec.baseline_params, 1.0 / spec.baseline_flops)


def check_choice(choice: str, rules: RuleSet) -> Choice:
    if choice not in CHOICES:
        raise MicronetError(f"unknown representation {choice!r} (known: {', '.join(CHOICES)})")
    if choice == "block" and not rules.mask.block_sparsity:
        raise MicronetError(f"rule set {rules.name} does not allow block sparsity: choose another representation")
    return choice  # type: ignore[return-value]


def block_options(
    values: torch.Tensor,
    nonzeros: int,
    width: int,
    mask: MaskPolicy,
    shape: tuple[int, int] | None = None,
    choice: Choice = "auto",
) -> list[Blocks]:
    """The block tilings worth pricing: the declared shape, or every candidate that could beat a mask.

    A tiling stores at least the nonzeros and one bit per block of at most 256 values: when even that is not
    cheaper than the nonzeros plus a per-element mask and not cheaper than dense, no tiling is tried (a tensor
    with a handful of accidental zeros is never tiled) unless block is forced; forced dense or masked: none."""
    if values.device.type == "meta" or not worth_tiling(values.numel(), nonzeros, width, mask, choice, shape):
        return []
    if shape is not None:
        return [tile(values, shape)]
    return candidates(values)


def worth_tiling(
    numel: int, nonzeros: int, width: int, mask: MaskPolicy, choice: Choice = "auto",
    shape: tuple[int, int] | None = None,
) -> bool:
    """Whether :func:`block_options` prices tilings of a tensor of these counts (see there)."""
    if not mask.block_sparsity or nonzeros >= numel or numel == 0 or choice in ("dense", "masked"):
        return False
    if shape is not None or choice == "block":
        return True
    floor = nonzeros * width + numel / 256 * mask.bits_per_block
    return floor < min(numel * width, nonzeros * width + numel * mask.bits_per_element)


def tiling_may_win(kept_elements: int, nonzeros: int, blocks: int, numel: int, width: int, mask: MaskPolicy) -> bool:
    """Whether a block tiling can store a tensor in fewer bits than its nonzeros plus a per-element mask; if not,
    it is never chosen (its dot products keep at least the nonzeros' terms too, and ties go to the mask).
    ``kept_elements`` and ``nonzeros`` may count part of the tensor (the zeros its kept blocks store only grow);
    ``blocks`` is the whole tensor's."""
    return (kept_elements - nonzeros) * width + blocks * mask.bits_per_block < numel * mask.bits_per_element


def options(numel: int, nonzeros: int, width: int, mask: MaskPolicy, blocks: list[Blocks]) -> list[Representation]:
    """Every legal representation of a tensor, dense first."""
    always = 0.0 if mask.only_sparse_tensors else numel * mask.bits_per_element
    found = [Representation("dense", numel, always, 1.0)]
    if nonzeros < numel:
        density = nonzeros / numel
        found.append(Representation("masked", nonzeros, numel * mask.bits_per_element, density))
        for tiling in blocks if mask.block_sparsity else ():
            found.append(
                Representation("block", tiling.kept_elements, tiling.blocks * mask.bits_per_block,
                               tiling.kept_elements / numel, tiling)
            )
    return found


def choose(
    found: list[Representation],
    width: int,
    unit: float,
    choice: Choice = "auto",
    weights: Weights = Weights(),
    uses: float = 0.0,
) -> Representation:
    """The representation to store: the forced kind when it applies, else the smallest effect on the score.

    ``uses``: 32-bit-equivalent operations per sample of the dot products that read the tensor, priced dense
    (a representation of density d keeps d of them). Ties go to the simpler representation (dense, masked, block)."""
    if choice != "auto":
        forced = [r for r in found if r.kind == choice]
        if forced:
            found = forced
        elif choice == "block":
            found = [r for r in found if r.kind == "masked"] or found
        else:
            found = found[:1]

    def effect(r: Representation) -> float:
        return r.bits(width) / unit * weights.storage + uses * r.density * weights.operations

    return min(found, key=effect)  # min keeps the first of equals: the simpler representation
