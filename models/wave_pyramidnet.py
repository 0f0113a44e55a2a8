"""Wave Computing's pruned PyramidNet-272 (MicroNet 2019, CIFAR-100), built from a checkpoint's shapes.

Every conv and the fc of PyramidNet-272 became a factorised layer (EigenDamage low-rank pruning)::

    rotation A (1x1, cin -> r_A)  ->  core (k x k, r_A -> r_G, the original stride)  ->  rotation G (1x1, r_G -> cout)

The fc's rotation A reads the input with a constant 1 appended (that is how the fc keeps a bias), so it has
cin + 1 columns. The ranks r_A, r_G of every layer exist only in the checkpoint. Residual, batch-norm and pooling
widths are PyramidNet's own.

Key formats read (all plain state dicts):

* **sparse** (``checkpoint_sparsity.pth``): ``<layer>.basis.sequential.0.conv.weight`` [r_A, cin, 1, 1],
  ``.1.weight`` [r_G, r_A, k, k], ``.2.conv.weight`` [cout, r_G, 1, 1]; the fc uses ``.0.linear.weight``
  [r_A, cin + 1], ``.1.weight`` [r_G, r_A], ``.2.linear.weight`` [classes, r_G]; every batch norm with its
  5 entries. 2,626 keys for the real network.
* **merged batch norm** (submissions 2 and 3): the batch norm that follows a conv (stem ``bn1``, every block's
  ``bn2``, ``bn3``, ``bn4``) is folded into that conv's rotation G, now a plain conv with bias:
  ``.2.weight`` and ``.2.bias``; the folded norms have no keys. Block ``bn1`` and ``bn_final`` stay.
* **quantized** (``checkpoint_quantization_*_submission.pth``): the same network inside ``quant_net.``, where every
  leaf module sits in a wrapper of the same name beside its activation quantizer (``bn1.bn1.weight``,
  ``bn1.quant.forward_bp``), and the input quantizer is ``quant_input.forward_bp``. The quantizers round to
  ``activation_bits`` (12) signed fixed point with the stored binary point; the weights are stored already rounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from micronet_score.models.pyramidnet import LayerFactory, PyramidNet
from micronet_score.models.registry import ModelSpec, image_of, register
from torch import Tensor, nn

from micronet_score.checkpoint import check_state_dict
from micronet_score.errors import MicronetError

QUANT_PREFIX = "quant_net."
QUANT_INPUT_KEY = "quant_input.forward_bp"
BP_SUFFIX = ".quant.forward_bp"

DEFAULT_CONFIG: dict[str, Any] = {
    "depth": 272,
    "alpha": 200,
    "num_classes": 100,
    "ranks": {},
    "merged_bn": False,
    "quantized": False,
    "activation_bits": 12,
}
"""Without a checkpoint every layer takes full rank (r_A = cin, r_G = cout); real ranks come from a checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Layers


class RotationConv(nn.Module):
    """A 1x1 rotation held as ``.conv`` (the key layout of Wave's basis layers)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class RotationLinear(nn.Module):
    """A linear rotation held as ``.linear``; with ``augment`` the input gets a constant-1 column (the bias)."""

    def __init__(self, cin: int, cout: int, augment: bool = False):
        super().__init__()
        self.augment = augment
        self.linear = nn.Linear(cin + int(augment), cout, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.augment:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        return self.linear(x)


class EigenBasis(nn.Module):
    """Rotation A, core, rotation G, in ``sequential``."""

    def __init__(self, a: nn.Module, core: nn.Module, g: nn.Module):
        super().__init__()
        self.sequential = nn.Sequential(a, core, g)

    def forward(self, x: Tensor) -> Tensor:
        return self.sequential(x)


class FactorisedLayer(nn.Module):
    """A pruned conv or fc: its factors live in ``basis``."""

    def __init__(self, basis: EigenBasis):
        super().__init__()
        self.basis = basis

    def forward(self, x: Tensor) -> Tensor:
        return self.basis(x)


@dataclass
class WaveLayers(LayerFactory):
    """Factorised layers with the given ranks (full rank where none is given); folded norms become Identity."""

    ranks: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    merged_bn: bool = False

    def conv(self, name: str, cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
        r_a, r_g = self.ranks.get(name, (cin, cout))
        core = nn.Conv2d(r_a, r_g, kernel, stride=stride, padding=kernel // 2, bias=False)
        g = nn.Conv2d(r_g, cout, 1, bias=True) if self.merged_bn else RotationConv(r_g, cout)
        return FactorisedLayer(EigenBasis(RotationConv(cin, r_a), core, g))

    def fc(self, name: str, cin: int, cout: int) -> nn.Module:
        r_a, r_g = self.ranks.get(name, (cin + 1, cout))
        core = nn.Linear(r_a, r_g, bias=False)
        return FactorisedLayer(EigenBasis(RotationLinear(cin, r_a, augment=True), core, RotationLinear(r_g, cout)))

    def norm(self, name: str, channels: int, mergeable: bool) -> nn.Module:
        return nn.Identity() if self.merged_bn and mergeable else nn.BatchNorm2d(channels)


class FixedPointQuantizer(nn.Module):
    """SigmaMax's rounding at a stored binary point bp: round(clamp(x * 2^bp, -2^(b-1), 2^(b-1) - 1)) / 2^bp."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("forward_bp", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        scale = 2.0 ** self.forward_bp.item()
        limit = 2 ** (self.bits - 1)
        return torch.round(torch.clamp(x * scale, -limit, limit - 1)) / scale


class QuantizedLeaf(nn.Module):
    """A leaf module under its own name, followed by its activation quantizer ``quant``."""

    def __init__(self, name: str, inner: nn.Module, bits: int):
        super().__init__()
        self.inner_name = name
        self.add_module(name, inner)
        self.quant = FixedPointQuantizer(bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant(getattr(self, self.inner_name)(x))


class QuantizedNet(nn.Module):
    """The input quantizer, then the network with every leaf quantized."""

    def __init__(self, net: nn.Module, bits: int):
        super().__init__()
        self.quant_input = FixedPointQuantizer(bits)
        self.quant_net = quantize_leaves(net, bits)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_net(self.quant_input(x))


def quantize_leaves(module: nn.Module, bits: int) -> nn.Module:
    """Wrap every leaf (except folded-away Identity norms) in a :class:`QuantizedLeaf`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Identity):
            continue
        if next(child.children(), None) is None:
            setattr(module, name, QuantizedLeaf(name, child, bits))
        else:
            quantize_leaves(child, bits)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def is_quantized(state: Mapping[str, Any]) -> bool:
    return any(key.startswith(QUANT_PREFIX) for key in state)


def canonical_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The sparse/merged key names of a state dict in any format (quantizer binary points dropped)."""
    if not is_quantized(state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key == QUANT_INPUT_KEY or key.endswith(BP_SUFFIX) or not key.startswith(QUANT_PREFIX):
            continue
        parts = key[len(QUANT_PREFIX):].split(".")
        if len(parts) >= 3 and parts[-2] == parts[-3]:
            del parts[-2]  # the wrapper level: <leaf>.<leaf>.weight -> <leaf>.weight
        out[".".join(parts)] = value
    return out


def config_from_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Depth, alpha, classes, the format and every layer's ranks, from the keys and shapes."""
    flat = canonical_state_dict(state)
    fc_a, fc_g = "fc.basis.sequential.0.linear.weight", "fc.basis.sequential.2.linear.weight"
    missing = [key for key in (fc_a, fc_g, "conv1.basis.sequential.1.weight") if key not in flat]
    if missing:
        raise MicronetError(f"not a Wave Computing pruned PyramidNet state dict: missing {', '.join(missing)}")
    blocks = 0
    while f"layer1.{blocks}.bn1.weight" in flat:
        blocks += 1
    final_width = flat[fc_a].shape[1] - 1
    config = dict(DEFAULT_CONFIG)
    config.update(
        depth=9 * blocks + 2,
        alpha=final_width / 4 - 16,
        num_classes=flat[fc_g].shape[0],
        merged_bn="conv1.basis.sequential.2.bias" in flat,
        quantized=is_quantized(state),
    )
    if float(config["alpha"]).is_integer():
        config["alpha"] = int(config["alpha"])
    ranks = {}
    for key, value in flat.items():
        if key.endswith(".basis.sequential.1.weight"):
            ranks[key[: -len(".basis.sequential.1.weight")]] = (value.shape[1], value.shape[0])
    config["ranks"] = ranks
    return config


def build(config: Mapping[str, Any]) -> nn.Module:
    """The factorised PyramidNet for a configuration; wrapped in quantizers when ``quantized``."""
    net = PyramidNet(
        config["depth"], config["alpha"], config["num_classes"],
        make=WaveLayers(dict(config.get("ranks", {})), bool(config.get("merged_bn", False))),
    )
    if config.get("quantized", False):
        return QuantizedNet(net, int(config.get("activation_bits", 12)))
    return net


def load_wave_pyramidnet(state: Mapping[str, Tensor]) -> nn.Module:
    """The evaluation-mode network of a sparse, BN-merged or quantized Wave checkpoint (a plain state dict)."""
    config = config_from_state_dict(state)
    with torch.device("meta"):
        model = build(config)
    check_state_dict(model, state, "the Wave Computing PyramidNet checkpoint")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


register(
    ModelSpec(
        name="wave-pyramidnet",
        title="Wave Computing's pruned PyramidNet-272 (factorised layers, sparse, optionally quantized), CIFAR-100",
        track="cifar100",
        build=build,
        default_config=DEFAULT_CONFIG,
        config_from_state_dict=config_from_state_dict,
        example_inputs=image_of("cifar100"),
        load=load_wave_pyramidnet,
        aliases=("wavecomp-pyramidnet",),
    )
)
