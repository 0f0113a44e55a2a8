"""Sparsity, bit-widths, freebie, quantization marks, model integrity, repeatability and the Counter API."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from torch.nn.utils import prune

import micronet_score as ms


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 100, bias=False), nn.ReLU(), nn.Linear(100, 10, bias=False)).eval()


X = torch.randn(1, 64)
WEIGHTS = 64 * 100 + 100 * 10


def zero_90(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                flat = m.weight.view(-1)
                flat[: int(flat.numel() * 0.9)] = 0


def test_dense_mlp_counts():
    r = ms.count(mlp(), X)
    assert r.family("dot_product").mults == WEIGHTS
    assert r.params == WEIGHTS


@pytest.mark.parametrize("how", ["zeros", "prune"])
def test_sparsity_shortens_dot_products_and_pays_the_mask(how):
    model = mlp()
    if how == "zeros":
        zero_90(model)
    else:
        for m in model:
            if isinstance(m, nn.Linear):
                prune.l1_unstructured(m, "weight", amount=0.9)
    for representation in ("masked", "auto"):
        r = ms.count(model, X, representation=representation)
        dot = r.family("dot_product")
        assert dot.mults == pytest.approx(0.1 * WEIGHTS)
        assert dot.adds == pytest.approx(0.1 * WEIGHTS - (100 + 10))  # (L - 1) per output
        assert r.layer("0").density == pytest.approx(0.1)
    masked = ms.count(model, X, representation="masked")
    assert masked.params == pytest.approx(0.1 * WEIGHTS + WEIGHTS / 32)  # nonzeros + 1-bit mask
    assert {t.representation for t in masked.tensors} == {"masked"}
    if how == "zeros":
        # Whole zero rows: 1x16 blocks are cheapest (by hand over the ten candidate shapes). Layer 0 (100x64,
        # rows 0-89 zero): 100 x 4 blocks, 40 kept, 640 values; layer 2 (10x100, rows 0-8 zero): 10 x 7 blocks
        # (the last 4 wide), 7 kept, 100 values. Masked: 640 + 100 values and 6,400 + 1,000 mask bits.
        assert r.params == pytest.approx((640 * 32 + 400 + 100 * 32 + 70) / 32)
        assert [t.representation for t in r.tensors] == ["block 1x16", "block 1x16"]


def test_eight_bits_quarter_storage_and_multiplies_adds_in_full():
    dense = ms.count(mlp(), X)
    quant = ms.count(mlp(), X, bits=8, act_bits=8)
    assert quant.params == dense.params / 4
    assert (quant.mults, quant.adds) == (dense.mults, dense.adds)
    dot = quant.family("dot_product")
    assert dot.flops == dot.mults / 4 + dot.adds


def test_multiply_runs_at_its_widest_input():
    r = ms.count(mlp(), X, bits=8)  # 8-bit weights x 32-bit activations: whole ops
    assert r.family("dot_product").flops == r.family("dot_product").mults + r.family("dot_product").adds
    assert r.params == WEIGHTS / 4


def test_per_tensor_weight_bits():
    r = ms.count(mlp(), X, weight_bits={"0.weight": 4})
    assert r.layer("0").storage == 6400 * 4 / 32 and r.layer("2").storage == 1000
    with pytest.raises(ms.MicronetError, match="nothing"):
        ms.count(mlp(), X, weight_bits={"nothing": 4})


def test_freebie():
    dense = ms.count(mlp(), X)
    free = ms.count(mlp(), X, freebie=True)
    assert free.params == dense.params / 2
    assert free.flops == dense.mults / 2 + dense.adds
    with pytest.raises(ms.MicronetError, match="freebie"):
        ms.count(mlp(), X, freebie=True, bits=8)


class FakeQuantMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)  # 256 levels: 8 bits
        return self.fc(x)


def test_fake_quantization_marks_activation_width():
    r = ms.count(FakeQuantMLP(), X, bits=8)
    dot = r.family("dot_product")
    assert dot.flops == dot.mults * 8 / 32 + dot.adds
    assert r.conversions == 1 and not r.uncounted


class Quantizer(nn.Module):
    output_bits = 4

    def forward(self, x):
        return torch.round(x.clamp(-1, 1) * 7) / 7


def test_output_bits_module_marks_outputs_and_its_ops_are_conversions():
    model = nn.Sequential(Quantizer(), nn.Linear(64, 10, bias=False)).eval()
    r = ms.count(model, X, bits=4)
    dot = r.family("dot_product")
    assert dot.flops == dot.mults * 4 / 32 + dot.adds
    assert r.conversions == 4 and not r.uncounted  # clamp, mul, round, div
    assert all(row.flops == 0 for row in r.layers if row.name == "0")


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


def assert_untouched(model: nn.Module, before) -> None:
    state, training, hooks = before
    now = model.state_dict(keep_vars=True)
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert torch.equal(v, now[k]) and v.dtype == now[k].dtype
    assert [m.training for m in model.modules()] == training
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    assert not torch._C._is_torch_function_mode_enabled()
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None


def test_counting_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    before = snapshot(model)
    ms.count(model, torch.randn(2, 3, 8, 8))
    # a training-mode batch norm updates its running stats in any forward: compare against a plain forward
    reference = copy.deepcopy(model)
    before = snapshot(reference)
    ms.count(model.eval(), torch.randn(2, 3, 8, 8))
    model.train()
    assert_untouched(reference, before)


def test_counting_changes_nothing_when_forward_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken().eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        ms.count(model, torch.randn(1, 4))
    assert_untouched(model, before)
    ms.count(nn.Linear(4, 4), torch.randn(1, 4))  # and counting still works afterwards


def test_eval_model_untouched_bit_identical():
    model = mlp()
    before = snapshot(model)
    ms.count(model, X, bits=8)
    assert_untouched(model, before)


def test_count_is_repeatable():
    model = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    assert ms.count(model, x) == ms.count(model, x)


def test_counter_accumulates_and_averages():
    model = mlp()
    single = ms.count(model, torch.randn(1, 64))
    counter = ms.Counter(model)
    with counter.measure(samples=2):
        model(torch.randn(2, 64))
    with counter.measure(samples=3):
        model(torch.randn(3, 64))
    r = counter.report()
    assert r.samples == 5
    assert (r.mults, r.adds, r.flops, r.params) == (single.mults, single.adds, single.flops, single.params)
    counter.reset()
    with pytest.raises(ms.MicronetError, match="nothing measured"):
        counter.report()
    with counter.measure():  # samples inferred from the first input's dim 0
        model(torch.randn(4, 64))
    assert counter.report().samples == 4


def test_layers_sum_to_totals_and_tied_tensors_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t))

    r = ms.count(Tied(), torch.randint(0, 50, (1, 5)), samples=5)
    assert r.params == 50 * 16
    for field in ("mults", "adds", "others", "flops", "storage"):
        total = getattr(r, "params" if field == "storage" else field)
        assert sum(getattr(row, field) for row in r.layers) == pytest.approx(total)


def test_frozen_parameters_and_buffers_read_are_stored():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8, bias=False)
            self.fc.weight.requires_grad_(False)
            self.register_buffer("scale", torch.ones(8))
            self.register_buffer("unused", torch.ones(100))

        def forward(self, x):
            return self.fc(x) * self.scale

    r = ms.count(Scaled(), torch.randn(1, 8))
    assert r.params == 64 + 8


def test_functional_ops_are_attributed_to_the_running_module():
    class Inner(nn.Module):
        def forward(self, x):
            return F.relu(x) @ x.t()

    model = nn.Sequential(nn.Identity(), Inner())
    r = ms.count(model, torch.randn(3, 5), samples=1)
    assert r.layer("1").mults == 15 + 3 * 3 * 5  # relu 1 mult x 15, then dot products of 5 for 3 x 3 outputs
    assert [row.name for row in r.layers] == ["1"]


def test_counter_sees_weights_pruned_between_measurements():
    model = mlp()
    counter = ms.Counter(model)
    with counter.measure(samples=1):
        model(X)
    assert counter.report().family("dot_product").mults == WEIGHTS
    zero_90(model)  # in place, as a pruning step of a training loop would
    counter.reset()
    with counter.measure(samples=1):
        model(X)
    assert counter.report().family("dot_product").mults == pytest.approx(0.1 * WEIGHTS)


class _ScaleQuantizer(nn.Module):
    """A quantizer that reads its scale buffers inside the conversion region (as the MIT quantizers do)."""

    output_bits = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("max_abs", torch.tensor(2.0))
        self.register_buffer("inv_scale", torch.tensor(2.0 / 127))

    def forward(self, x):
        return torch.round(torch.clamp(x, -self.max_abs, self.max_abs) / self.inv_scale) * self.inv_scale


def test_quantizer_scales_are_stored_and_its_ops_are_conversions():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), _ScaleQuantizer())
    report = ms.count(net, torch.randn(1, 4))
    # 16 weights + the 2 scale values the quantizer needs for inference, all at 32 bits
    assert report.params == 16 + 2
    assert report.layer("1").storage == 2
    # neg (of max_abs), clamp, div, round, mul run inside the quantizer: 5 free conversions, no ops
    assert report.conversions == 5 and report.layer("1").flops == 0
