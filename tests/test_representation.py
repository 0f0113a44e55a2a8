"""One representation per stored tensor (issue 14, defects 1, 10, 11): dense, nonzeros + 1-bit mask, or
block-sparse with one bit per block, chosen by its effect on the score; the dot products follow the choice; count
and audit share the rule; shape-only totals equal the real run's; parameters of modules that never run are not
stored. Every expected number is derived by hand in the test (rules §1.3) or is a published figure."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from micronet_score.models import registry
from torch import nn

import micronet_score as ms
from micronet_score.audit import audit
from micronet_score.checkpoint import save_checkpoint
from micronet_score.errors import MicronetError


def linear_8x8_with_a_zero_block() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.uniform_(0.5, 1.0)  # no accidental zeros
        model.weight[:4, :4] = 0
    return model


def test_count_and_audit_store_a_zero_block_alike():
    """An 8x8 8-bit weight with one zero 4x4 block: dense 512 bits, nonzeros + mask 48*8 + 64 = 448, 4x4 blocks
    48*8 + 4 = 388 (the cheapest of the candidate shapes: 2x2, 4x1 and 1x4 tilings cost 48*8 + 16 = 400)."""
    model = linear_8x8_with_a_zero_block()
    report = ms.count(model, torch.randn(1, 8), weight_bits={"weight": 8})
    entry = audit(model, weight_bits={"weight": 8}).tensor("weight")
    assert report.params * 32 == 388
    assert entry.stored_values * 8 + entry.mask_bits == 388
    assert report.tensors[0].representation == entry.representation == "block 4x4"
    assert report.layer("").representation == "block 4x4"
    assert report.mults == 48  # three kept blocks of 16: the all-zero block is skipped, the kept ones are not


@pytest.mark.parametrize(
    ("representation", "bits", "mults"),
    [("dense", 512, 64), ("masked", 448, 48), ("block", 388, 48), ("auto", 388, 48)],
)
def test_a_forced_representation_sets_storage_and_dot_products(representation, bits, mults):
    model = linear_8x8_with_a_zero_block()
    report = ms.count(model, torch.randn(1, 8), weight_bits={"weight": 8}, representation=representation)
    assert (report.params * 32, report.mults, report.adds) == (bits, mults, mults - 8)  # n - 1 adds per output
    entry = audit(model, weight_bits={"weight": 8}, representation=representation).tensor("weight")
    assert entry.stored_values * 8 + entry.mask_bits == bits


def test_an_unknown_representation_is_refused():
    with pytest.raises(MicronetError, match="unknown representation"):
        ms.count(nn.Linear(2, 2), torch.randn(1, 2), representation="sparse")


def test_accidental_zeros_are_stored_dense():
    """Three exact zeros in a 256x256 weight (normal initialisation yields a few): a mask would cost 65,536 bits
    to save 3 * 32, so the weight is stored dense and its dot products are dense too."""
    torch.manual_seed(0)
    model = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        model.weight.view(-1)[[5, 700, 40_000]] = 0
    report = ms.count(model, torch.randn(2, 256))
    assert report.params == 256 * 256
    assert report.family("dot_product").mults == 256 * 256  # per sample: every weight once
    assert [t.representation for t in report.tensors] == ["dense"]


def test_an_embedding_padding_row_is_stored_dense():
    """nn.Embedding(padding_idx=0) holds one zero row: 64 zeros of 64,000 values (BERT's added 0.86%)."""
    torch.manual_seed(0)
    model = nn.Embedding(1000, 64, padding_idx=0)
    report = ms.count(model, torch.tensor([[1, 2, 3]]))
    assert report.params == 64_000
    masked = ms.count(model, torch.tensor([[1, 2, 3]]), representation="masked")
    assert masked.params == 63_936 + 64_000 / 32


def conv_with_zeros(zeros: int) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.view(-1)[::184][:zeros] = 0  # scattered: no block of any candidate shape is all zero
    assert int((conv.weight == 0).sum()) == zeros
    return conv


@pytest.mark.parametrize(("zeros", "with_track", "kind"), [(200, True, "masked"), (100, True, "dense"),
                                                           (200, False, "dense")])
def test_the_choice_weighs_storage_and_operations_as_the_score_does(zeros, with_track, kind):
    """A 3x3 conv 64 -> 64 on 32x32 (CIFAR-100: baselines 36.5M values, 10.49G operations). With k zeros, the
    mask costs 36,864 - 32k bits (1,152 - k values) and saves k * 1,024 mults and as many 32-bit adds per image:
    masked is better for the score when (1152 - k) / 36.5e6 < 2048 k / 10.49e9, i.e. k > 141.8. Without a track
    there is no score and the smaller storage wins (dense until k = 1,152)."""
    conv = conv_with_zeros(zeros)
    report = ms.count(conv, torch.randn(1, 64, 32, 32), track="cifar100" if with_track else None)
    assert [t.representation for t in report.tensors] == [kind]
    kept = 36_864 - (zeros if kind == "masked" else 0)
    assert report.family("dot_product").mults == kept * 1024
    assert report.params == (kept + (1152 if kind == "masked" else 0))


def test_block_sparse_dot_products_multiply_the_zeros_of_kept_blocks():
    """8x8 8-bit weight, rows 0-3 zero but one value at (0, 0): 33 nonzeros. Masked: 33*8 + 64 = 328 bits. Tilings:
    2x2, 4x1 and 1x4 keep 9 of 16 blocks (36 values + 16 bits = 304, the first of them, 2x2, is taken); 4x4 keeps
    3 of 4 (388); 1x8 and 1x16 keep 5 rows (328); the rest keep all. The kept block around (0, 0) holds 3 zeros,
    stored and multiplied: 36 mults."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.uniform_(0.5, 1.0)
        model.weight[:4] = 0
        model.weight[0, 0] = 1.0
    report = ms.count(model, torch.randn(1, 8), weight_bits={"weight": 8})
    assert report.tensors[0].nonzeros == 33 and report.tensors[0].representation == "block 2x2"
    assert report.params * 32 == 36 * 8 + 16
    assert report.mults == 36


@pytest.mark.parametrize("grad", [True, False])
def test_a_fused_kernel_scales_only_the_dot_products_of_its_sparse_weight(grad):
    """nn.MultiheadAttention (embed 16, 2 heads, 5 tokens; without grad torch runs one fused kernel for the
    projections and the attention, with grad the separate ops). out_proj's rows 0-7 are zero: 8x8 blocks keep
    2 of 4 (128 values + 4 bits, cheaper than 128 + a 256-bit mask), density 1/2. Dot-product mults by hand:
    in_proj 5*48*16 = 3,840, Q K^T 2*5*5*8 = 400, weights x V 2*5*8*5 = 400, out_proj 5*16*16 / 2 = 640."""
    torch.manual_seed(0)
    model = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    with torch.no_grad():
        model.out_proj.weight[:8] = 0
    x = torch.randn(1, 5, 16)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = model

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    counter = ms.Counter(Self())
    with torch.set_grad_enabled(grad), counter.measure(samples=1):  # with grad: the unfused ops
        counter.model(x)
    report = counter.report()
    assert report.family("dot_product").mults == 3840 + 400 + 400 + 640
    row = {t.name: t for t in report.tensors}["attention.out_proj.weight"]
    assert row.representation == "block 8x8" and row.storage * 32 == 128 * 32 + 4


class UnusedNet(nn.Module):
    """fvcore's "unused module" test case: fc1 10 -> 10, relu, fc2 10 -> 1; ``unused`` (10 -> 10) never runs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(10, 10), nn.Linear(10, 1), nn.Linear(10, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_parameters_of_modules_that_never_run_are_not_stored():
    report = ms.count(UnusedNet(), torch.randn(1, 10))
    assert report.params == (10 * 10 + 10) + (10 + 1)
    assert report.unused == ["unused.weight", "unused.bias"]
    assert any("unused.weight" in w for w in report.warnings)
    shapes = ms.count(UnusedNet(), torch.randn(1, 10), shape_only=True)
    assert (shapes.params, shapes.unused) == (report.params, report.unused)


class ReadNotCalled(nn.Module):
    """A head whose module never runs but whose tensors the forward reads (the JAIST decoder: F.linear on the tied
    weight and on the decoder's bias, sliced)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, x):
        return F.linear(self.body(x), self.head.weight[:3], self.head.bias[:3])


def test_tensors_read_by_the_forward_are_stored_though_their_module_never_runs():
    report = ms.count(ReadNotCalled(), torch.randn(1, 4))
    assert report.params == 4 * 4 + 4 + 4 * 6 + 6 and report.unused == []


def test_the_jaist_qrnn_with_random_weights_scores_its_published_storage():
    """seed-systems A.6: 104,906,238 parameters (model and split-softmax tombstones); under the freebie, 16 bits
    each: 52,453,119 (52.453M). Random normal weights hold a few exact zeros (a mask over the 80M-value embedding
    would add 2.5M): they must be stored dense."""
    torch.manual_seed(0)
    spec = registry.get("jaist-qrnn")
    model = spec.build(spec.default_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        assert int((model.encoder.weight == 0).sum()) > 0  # the accidental zeros this test is about
        report = ms.count(model, torch.zeros(2, 1, dtype=torch.long), track=spec.track, freebie=True)
    assert report.params == pytest.approx(104_906_238 * 16 / 32, rel=1e-3)
    assert report.unused == []


@pytest.fixture(scope="module")
def hf_models():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                    bos_token_id=0, eos_token_id=0)
        )
        llama = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                     max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        )
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_shape_only_totals_equal_the_real_run_on_hugging_face_models(hf_models, name):
    """The real CPU run takes torch's fused attention kernel; on meta tensors torch takes the math path (GPT-2
    small: +98,304 mults) unless counting asks for the kernel the real device would run."""
    model, tokens = hf_models[name], torch.randint(1, 100, (1, 8))
    real = ms.count(model, tokens)
    shapes = ms.count(model, tokens, shape_only=True)
    assert (shapes.mults, shapes.adds, shapes.others) == (real.mults, real.adds, real.others)
    assert shapes.params == real.params
    assert {r.name: (r.mults, r.adds, r.others) for r in shapes.layers} == {
        r.name: (r.mults, r.adds, r.others) for r in real.layers
    }
    assert not shapes.uncounted and not shapes.warnings


def test_cli_reports_and_forces_the_representation(cli, tmp_path):
    """A small WRN checkpoint (CIFAR-100 track) whose classifier (64 -> 10, 640 values, used once per image)
    holds 3 accidental zeros: a mask costs 20 values to save 3 values and 6 operations per image, so auto stores it
    dense; forced masked, 637 + 640/32."""
    config = {"depth": 10, "widen": 1, "num_classes": 10}
    torch.manual_seed(0)
    net = registry.get("wrn-28-10").build(config)
    with torch.no_grad():
        net.fc.weight.view(-1)[[0, 100, 200]] = 0
    path = save_checkpoint(tmp_path / "wrn.pt", "wrn-28-10", config, net.state_dict())

    def run(*args):
        code, out, err = cli("count", str(path), "--json", *args)
        assert code == 0, err
        return json.loads(out)

    auto, masked = run(), run("--representation", "masked")
    fc = {t["name"]: t for t in auto["tensors"]}["fc.weight"]
    assert (fc["representation"], fc["storage"]) == ("dense", 640)
    fc = {t["name"]: t for t in masked["tensors"]}["fc.weight"]
    assert (fc["representation"], fc["storage"]) == ("masked", 637 + 640 / 32)
    assert {r["name"]: r["representation"] for r in masked["layers"]}["fc"] == "masked+dense"  # weight, bias
    assert masked["params"] - auto["params"] == pytest.approx(640 / 32 - 3)
    assert masked["mults"] == pytest.approx(auto["mults"] - 3)
    code, out, _ = cli("breakdown", str(path), "--format", "csv", "--representation", "dense")
    header, *rows = out.splitlines()
    column = header.split(",").index("representation")
    assert code == 0 and {r.split(",")[0]: r.split(",")[column] for r in rows}["fc"] == "dense"
    # compare and report take the same flag: the forced mask costs 640/32 - 3 values more (a copy's fc is masked)
    code, out, err = cli("compare", str(path), str(path), "--json", "--representation", "masked")
    assert code == 0, err
    assert json.loads(out)[str(path)]["storage"] == pytest.approx(auto["storage"] + 640 / 32 - 3)
    code, _, err = cli("report", str(path), "-o", str(tmp_path / "r.html"), "--representation", "masked")
    assert code == 0 and (tmp_path / "r.html").is_file(), err
