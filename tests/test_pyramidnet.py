"""PyramidNet-272 and Wave Computing's pruned variant in its three key formats (checkpoints generated here)."""

from __future__ import annotations

import pytest
import torch
from micronet_score.models import pyramidnet, wave_pyramidnet
from micronet_score.models.registry import get
from wave_checkpoints import SHALLOW, merge_batch_norms, quantize_keys, rank, sparse_checkpoint

from micronet_score.errors import MicronetError

# The spec's per-stage widths (B.1), first and last blocks of each stage.
SPEC_WIDTHS = {0: (18, 20, 23, 83), 1: (85, 87, 89, 149), 2: (152, 154, 156, 216)}


def test_widths_match_the_spec():
    stages = pyramidnet.stage_widths(272, 200)
    for s, (a, b, c, last) in SPEC_WIDTHS.items():
        assert stages[s][:3] == [a, b, c] and stages[s][-1] == last and len(stages[s]) == 30
    assert sum(map(sum, stages)) == 10_540  # the spec's sum of planes


def test_pyramidnet_272_parameter_count_on_meta():
    spec = get("pyramidnet")
    with torch.device("meta"):
        model = spec.build(spec.default_config)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 26_288_692  # B.1
    assert sum(p.numel() for k, p in params.items() if "conv" in k) == 25_991_328
    assert sum(p.numel() for k, p in params.items() if "bn" in k) == 210_864
    assert sum(p.numel() for k, p in params.items() if k.startswith("fc")) == 86_500


def test_pyramidnet_forward_applies_shakedrop_expectation():
    model = pyramidnet.PyramidNet(depth=11, alpha=12, num_classes=10).eval()  # 1 block per stage
    assert [b.shake_drop.p_drop for s in (model.layer1, model.layer2, model.layer3) for b in s] == [
        pytest.approx(0.5 / 3), pytest.approx(1 / 3), pytest.approx(0.5)]
    block = model.layer2[0]
    x = torch.randn(1, block.bn1.num_features, 8, 8)
    with torch.no_grad():
        out = block(x)
        block.shake_drop.p_drop = 1.0  # residual branch off: only the pooled, zero-padded shortcut is left
        shortcut = block(x)
    assert out.shape == shortcut.shape == (1, block.conv3.out_channels, 4, 4)
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(shortcut[:, : x.shape[1]], pooled)
    assert torch.count_nonzero(shortcut[:, x.shape[1]:]) == 0
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ------------------------------------------------------------------------------------------------------------------
# Wave Computing checkpoints, written out by hand from the spec's key list (B.3)
#
# Key counts, ranks and parameter deltas are asserted on the real 272-layer structure (building and loading it
# costs a fraction of a second). Numerical checks (a forward pass, BN merging computes the same function, the
# quantizers' grid) run on a shallow PyramidNet-29 (3 blocks per stage) with the same code paths: stem, identity
# and stride-2 pooled shortcuts, zero padding, every layer factorised, the augmented fc. A forward of the 272-layer
# network costs seconds on a cold CPU (each of its ~800 distinct conv shapes is set up once), which is what made
# these tests slow; it exercises no code the shallow network does not.

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def sparse():
    return sparse_checkpoint()


@pytest.fixture(scope="module")
def shallow():
    return sparse_checkpoint(1, **SHALLOW)


def test_sparse_format_loads_with_ranks_from_the_checkpoint(sparse, shallow):
    assert len(sparse) == 2_626
    config = get("wave-pyramidnet").config_from_state_dict(sparse)
    assert (config["depth"], config["alpha"], config["num_classes"]) == (272, 200, 100)
    assert not config["merged_bn"] and not config["quantized"]
    assert config["ranks"]["layer2.0.conv2"] == rank("layer2.0.conv2")
    assert len(config["ranks"]) == 1 + 270 + 1
    model = wave_pyramidnet.load_wave_pyramidnet(sparse)
    core = model.layer2[0].conv2.basis.sequential[1]
    assert core.stride == (2, 2) and core.kernel_size == (3, 3)
    assert model.fc.basis.sequential[0].linear.in_features == 865
    # the forward, on the shallow network (see above)
    small = wave_pyramidnet.load_wave_pyramidnet(shallow)
    assert (small.layer3[0].conv2.basis.sequential[1].stride, small.final_width) == ((2, 2), 208)
    with torch.no_grad():
        out = small(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_merged_format_computes_the_same_function_with_63256_fewer_parameters(sparse, shallow):
    merged = merge_batch_norms(sparse)
    assert len(merged) == 2_626 - 5 * (1 + 270) + (1 + 270)
    plain = wave_pyramidnet.load_wave_pyramidnet(sparse)
    folded = wave_pyramidnet.load_wave_pyramidnet(merged)
    assert n_params(folded) - n_params(plain) == -63_256  # -(16 + 6 x 10,540), B.3
    # the same function, on the shallow network: -(16 + 6 x (20 + 24 + ... + 52)) parameters there
    small_plain = wave_pyramidnet.load_wave_pyramidnet(shallow)
    small_folded = wave_pyramidnet.load_wave_pyramidnet(merge_batch_norms(shallow, **SHALLOW))
    assert n_params(small_folded) - n_params(small_plain) == -(16 + 6 * 324)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small_folded(x), small_plain(x), rtol=1e-4, atol=1e-4)


def test_quantized_formats_have_the_spec_key_counts_and_quantize_activations(sparse, shallow):
    first = quantize_keys(sparse)
    second = quantize_keys(merge_batch_norms(sparse))
    assert len(first) == 3_989 and len(second) == 2_634  # B.3: submission 1; submissions 2 and 3
    assert "quant_net.conv1.basis.sequential.0.conv.conv.weight" in first
    assert "quant_net.layer2.0.bn1.bn1.weight" in first and "quant_net.conv1.basis.sequential.2.2.bias" in second
    for state, merged in ((first, False), (second, True)):
        config = wave_pyramidnet.config_from_state_dict(state)
        assert config["quantized"] and config["merged_bn"] == merged
        model = wave_pyramidnet.load_wave_pyramidnet(state)
        assert len(model.state_dict()) == len(state)
    # the activation quantizers, on the shallow network
    for state in (quantize_keys(shallow, **SHALLOW), quantize_keys(merge_batch_norms(shallow, **SHALLOW), **SHALLOW)):
        model = wave_pyramidnet.load_wave_pyramidnet(state)
        assert len(model.state_dict()) == len(state)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 100)
        grid = out * 2**6  # the fc's last quantizer: 12-bit fixed point with binary point 6
        torch.testing.assert_close(grid, grid.round())
        assert grid.abs().max() <= 2**11


def test_bad_wave_checkpoints_list_the_problems(sparse):
    broken = dict(sparse)
    del broken["layer1.3.bn2.running_var"]
    broken["layer1.4.conv2.basis.sequential.2.conv.weight"] = torch.zeros(5, 5, 1, 1)
    broken["stray"] = torch.zeros(1)
    with pytest.raises(MicronetError) as err:
        wave_pyramidnet.load_wave_pyramidnet(broken)
    message = str(err.value)
    assert "1 missing: layer1.3.bn2.running_var [25]" in message
    assert "1 misshapen: layer1.4.conv2.basis.sequential.2.conv.weight [5, 5, 1, 1] (expected [" in message
    assert "1 unexpected: stray" in message
    with pytest.raises(MicronetError, match="not a Wave Computing"):
        wave_pyramidnet.load_wave_pyramidnet({"conv1.weight": torch.zeros(16, 3, 3, 3)})


def test_bad_wave_checkpoints_count_every_key_and_name_the_first(sparse):
    gone = [key for key in sparse if key.endswith("running_var")][:25]
    broken = {k: v for k, v in sparse.items() if k not in gone}
    with pytest.raises(MicronetError) as err:
        wave_pyramidnet.load_wave_pyramidnet(broken)
    message = str(err.value)  # readable however many keys: the count, the first five, how many more
    assert f"{len(gone)} missing:" in message and all(key in message for key in gone[:5])
    assert f"and {len(gone) - 5} more" in message and gone[5] not in message
