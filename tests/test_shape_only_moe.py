"""Shape-only counting of mixture-of-experts models, and the policy for ops whose output depends on values.

A tiny Mixtral (hidden E = 32, L = 2 layers, H = 4 heads with 2 key/value heads, experts' width FF = 64, 4
experts, top-2, vocabulary V = 100, T = 8 tokens), random weights. Reference: the dot products written by hand from
the architecture (a dot product of length n is n mults), and the real run's totals.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import micronet_score as ms
from micronet_score.counting.shapes import META_FAST
from micronet_score.errors import MicronetError

tf = pytest.importorskip("transformers")

E, L, H, KV, FF, V, T, EXPERTS, TOP = 32, 2, 4, 2, 64, 100, 8, 4, 2
IDS = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))


def mixtral(experts: str) -> nn.Module:
    config = tf.MixtralConfig(
        hidden_size=E, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV, intermediate_size=FF,
        vocab_size=V, num_local_experts=EXPERTS, num_experts_per_tok=TOP, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    config._experts_implementation = experts
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(config).eval()


def hand_dot_products() -> int:
    """Per layer and token: q and o projections (2 E^2), k and v (2 E KV d, d = E / H), the router (E x 4
    experts), the top-2 experts' gate, up and down projections (2 x 3 E FF); attention scores and weighted values
    over the T tokens (2 T E); then the head (E V) per token."""
    d = E // H
    per_token = 2 * E * E + 2 * E * KV * d + E * EXPERTS + TOP * 3 * E * FF + 2 * T * E
    return L * T * per_token + T * E * V


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_shape_only_mixtral_counts_the_routed_experts(experts):
    model = mixtral(experts)
    with torch.no_grad():
        shapes = ms.count(model, IDS, samples=1, strict=True, shape_only=True)
        real = ms.count(model, IDS, samples=1, strict=True)
    assert shapes.family("dot_product").mults == hand_dot_products()
    # every token is routed to exactly its top-2 experts whatever the weights: the routed rows are T x 2 in both
    # runs, so every total equals the real run's
    assert (shapes.params, shapes.flops, shapes.mults, shapes.adds, shapes.others) == (
        real.params,
        real.flops,
        real.mults,
        real.adds,
        real.others,
    )
    assert not shapes.uncounted


def test_eager_experts_are_refused_naming_the_op_and_the_way_out():
    model = mixtral("eager")
    with pytest.raises(MicronetError) as err, torch.no_grad():
        ms.count(model, IDS, samples=1, shape_only=True)
    message = str(err.value)
    assert "aten.nonzero" in message and "grouped_mm" in message and "without shape_only" in message
    with torch.no_grad():  # the real run counts it
        assert ms.count(model, IDS, samples=1, strict=True).family("dot_product").mults == hand_dot_products()


class Item(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


class CpuMask(nn.Module):
    """Picks columns with a mask computed on the CPU inside the forward (its values exist in shape-only counting
    too, and must be computed: doubled, then negatives zeroed in place, [2, 0, -2, 6] -> [2, 0, 0, 6])."""

    def forward(self, x):
        keep = (torch.tensor([1.0, 0.0, -1.0, 3.0]) * 2).relu_().nonzero().squeeze(1)
        return x[:, keep] * 2


def test_item_on_meta_is_refused_by_name():
    with pytest.raises(MicronetError, match=r"Tensor\.item\(\) / \.tolist\(\)"):
        ms.count(Item(), torch.ones(2, 4), shape_only=True)


def test_data_dependent_ops_on_tensors_with_values_still_run():
    x = torch.ones(2, 4)
    shapes = ms.count(CpuMask(), x, shape_only=True, samples=1)
    assert shapes.family("mul").mults == 4 + 2 * 2  # the mask's 4 values doubled; 2 kept columns of 2 rows doubled
    assert shapes.flops == ms.count(CpuMask(), x, samples=1).flops


LAYOUTS = {  # (a, b, offs groups): 2-d x 3-d (routed rows), 3-d x 2-d, 2-d x 2-d (k split), 3-d x 3-d (batched)
    "2d-3d": ((24, 16), (4, 16, 8), 4),
    "3d-2d": ((4, 6, 16), (16, 32), 4),
    "2d-2d": ((6, 32), (32, 8), 4),
    "3d-3d": ((4, 6, 16), (4, 16, 8), None),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_mm_output_equals_torch_meta_kernel_and_cpu_kernel(name):
    a_shape, b_shape, groups = LAYOUTS[name]
    op = torch.ops.aten._grouped_mm.default
    meta = {"device": "meta", "dtype": torch.bfloat16}
    a, b = torch.empty(a_shape, **meta), torch.empty(b_shape, **meta)
    offs = None if groups is None else torch.empty(groups, dtype=torch.int32, device="meta")
    fast = META_FAST[op]((a, b, offs), {})
    expected = op(a, b, offs)  # torch's meta kernel (bfloat16 only)
    assert (fast.shape, fast.stride(), fast.dtype) == (expected.shape, expected.stride(), expected.dtype)
    # float32, which the meta kernel refuses: the shape the CPU kernel computes with real values
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    cut = None
    if groups is not None:
        along = a_shape[0] if name == "2d-3d" else (b_shape[1] if name == "3d-2d" else a_shape[1])
        cut = torch.linspace(along / groups, along, groups).round().to(torch.int32)
    real = op(a32, b32, cut)
    fast32 = META_FAST[op]((a32.to("meta"), b32.to("meta"), None if cut is None else cut.to("meta")), {})
    assert (fast32.shape, fast32.dtype) == (real.shape, real.dtype)


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_cli_counts_a_mixtral_config_or_refuses_in_one_line(cli, tmp_path, experts):
    """A directory with only config.json: the grouped_mm experts count with the real run's totals (the same
    architecture with random weights on 128 tokens); the eager experts end in one error line, exit 2."""
    config = mixtral(experts).config
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(tmp_path)
    if experts == "eager":
        config_json = json.loads((tmp_path / "config.json").read_text())
        config_json["experts_implementation"] = "eager"
        (tmp_path / "config.json").write_text(json.dumps(config_json))
    code, out, err = cli("count", str(tmp_path), "--shape-only", "--json")
    if experts == "eager":
        assert code == 2 and err.count("error:") == 1 and "aten.nonzero" in err
        return
    assert code == 0, err
    report = json.loads(out)
    with torch.no_grad():  # the real run of the same architecture (random weights) on 128 tokens
        real = ms.count(mixtral(experts), torch.randint(0, V, (1, 128)), samples=1)
    assert (report["mults"], report["adds"], report["others"]) == (real.mults, real.adds, real.others)
