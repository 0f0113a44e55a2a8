"""One options object for the command line, Counter and count(); declared widths resolved in one place."""

import json

import pytest
import torch
from micronet_score.models.mit_lm import demo_paths
from own_models import SmallCNN

import micronet_score as ms


def test_options_object_and_keywords_are_the_same_count():
    model, x = SmallCNN().eval(), torch.zeros(1, 3, 32, 32)
    by_keywords = ms.count(model, x, track="cifar100", bits=8, act_bits=8)
    by_object = ms.count(model, x, options=ms.CountOptions(track="cifar100", bits=8, act_bits=8))
    counter = ms.Counter(model, ms.CountOptions(track="cifar100"), bits=8, act_bits=8)  # keywords over the object
    with counter.measure(samples=1):
        model(x)
    assert by_keywords.flops == by_object.flops == counter.report().flops
    assert by_keywords.score == by_object.score and by_keywords.track == "cifar100"
    # 8-bit multiplications of the convolutions cost a quarter of an fp32 one: not the fp32 count
    assert by_keywords.flops < ms.count(model, x).flops


def test_unknown_option_and_wrong_options_type():
    model = SmallCNN()
    with pytest.raises(ms.MicronetError, match="unknown option"):
        ms.Counter(model, bitz=8)
    with pytest.raises(ms.MicronetError, match="options must be a CountOptions"):
        ms.Counter(model, "micronet-2019")


def test_audit_honours_the_configs_declared_width(cli):
    """The demo's config says ``bits: 9`` for a quantized model: audit declares 9-bit weights from it, as count and
    eval do, without --bits."""
    checkpoint, config, _ = demo_paths()
    code, out, err = cli("audit", str(checkpoint), "--config", str(config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["bits"] == 9 and not result["violations"]
    declared = {t["name"]: t["declared_bits"] for t in result["tensors"]}
    # quantized tensors at the config's 9 bits; the position table and layer norms are declared unquantized
    assert declared["layers.0.qkv.weight"] == 9 and declared["loss.layers.1.bias"] == 9
    assert declared["layers.0.pos_emb"] is None and declared["layers.1.ln2.weight"] is None
