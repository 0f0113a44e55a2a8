"""Counting a model directory from its files (streamed shards, meta-device forward) against independent
references: the in-memory audit and count of the same values, and hand formulas of a Llama's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import micronet_score as ms  # noqa: E402
from micronet_score.audit import audit  # noqa: E402
from micronet_score.cli import app  # noqa: E402
from micronet_score.counting.blocks import candidates  # noqa: E402
from micronet_score.scoring import CountOptions, measure_directory  # noqa: E402
from micronet_score.streaming import measure_files, read_header, weight_files  # noqa: E402

TOKENS = 128
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    unstructured = torch.randn(100, 70, generator=g).to(torch.bfloat16)
    unstructured[torch.rand(100, 70, generator=g) < 0.5] = 0
    blocks = torch.randn(64, 48, generator=g)
    blocks *= (torch.rand(16, 12, generator=g) < 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1)
    return {
        "unstructured": unstructured,
        "block4x4": blocks,
        "grid4": torch.randint(-8, 8, (50, 33), generator=g).float() * 0.125,  # 4-bit symmetric grid
        "rows8": torch.randint(-128, 128, (40, 20), generator=g).float() * torch.rand(40, 1, generator=g),
        "vector": torch.randn(300, generator=g),
        "grid_vector": torch.randint(-2, 2, (5000,), generator=g).float() * 0.5,
        "dense": torch.randn(37, 5, generator=g),
        "int8": torch.randint(-100, 100, (64, 64), dtype=torch.int8, generator=g),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 20])
def test_streamed_statistics_equal_the_audit_of_the_values_in_memory(tmp_path, chunk_bytes):
    tensors = _tensors()
    names = list(tensors)
    save_file({k: tensors[k] for k in names[:4]}, tmp_path / "a.safetensors")
    save_file({k: tensors[k] for k in names[4:]}, tmp_path / "b.safetensors")
    seen = []
    stats = measure_files(weight_files(tmp_path), chunk_bytes=chunk_bytes, progress=seen.append)
    reference = audit(tensors)
    for name in names:
        s, a = stats[name], reference.tensor(name)
        assert (s.nonzeros, s.measured_bits, s.row_bits) == (a.nonzeros, a.measured_bits, a.row_bits), name
        whole = candidates(tensors[name]) if tensors[name].dim() > 1 and s.nonzeros < s.numel else []
        assert s.tilings == whole, name  # every tiling, summed over chunks, equals the whole tensor's
    four = next(b for b in stats["block4x4"].tilings if b.shape == (4, 4))
    assert four.exact and four.kept == reference.tensor("block4x4").blocks_kept  # the audit's choice: 4x4 blocks
    assert stats["grid4"].measured_bits == 4
    assert stats["rows8"].measured_bits is None and stats["rows8"].row_bits == 8
    assert sum(seen) == sum(t.numel() * t.element_size() for t in tensors.values())  # progress over every byte
    block_rows = max(16 * t[0].numel() * t.element_size() for t in tensors.values() if t.dim() == 2 and len(t))
    assert max(seen) <= max(chunk_bytes, block_rows)  # at most chunk_bytes, or 16 rows (the tallest block)


def _llama(tmp_path: Path, shard: str = "60KB") -> tuple[torch.nn.Module, Path]:
    """A tiny Llama with random weights: one MLP weight 50% pruned, one by 4x4 blocks, one attention weight on a
    4-bit grid, one embedding row of zeros; saved as sharded safetensors the way transformers saves it."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        up = model.model.layers[0].mlp.up_proj.weight
        up[torch.rand_like(up) < 0.5] = 0
        q = model.model.layers[1].self_attn.q_proj.weight
        scale = q.abs().max() / 7
        q.copy_((q / scale).round().clamp(-8, 7) * scale)
        model.model.embed_tokens.weight[3] = 0
        down = model.model.layers[1].mlp.down_proj.weight  # pruned by 4x4 blocks: stored block-sparse
        rows, cols = down.shape
        down *= (torch.rand(rows // 4, cols // 4) < 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1)
    directory = tmp_path / "llama"
    model.save_pretrained(directory, max_shard_size=shard)
    return model, directory


def _totals(report):
    return (report.params, report.flops, report.mults, report.adds, report.others)


def test_a_sharded_model_counted_from_its_files_equals_the_in_memory_count(tmp_path):
    model, directory = _llama(tmp_path)
    assert len(weight_files(directory)) > 2  # really sharded, through the index
    ids = torch.zeros((1, TOKENS), dtype=torch.long)
    in_memory = ms.count(model, ids, shape_only=True)
    real = ms.count(model, ids)
    streamed = measure_directory(directory, CountOptions(), progress=False, chunk_bytes=4096)
    assert _totals(streamed) == pytest.approx(_totals(in_memory), rel=1e-12)
    assert _totals(streamed) == pytest.approx(_totals(real), rel=1e-12)
    rows = {r.name: (r.params, r.nonzeros, r.storage, r.flops) for r in streamed.layers}
    assert rows == {r.name: (r.params, r.nonzeros, r.storage, r.flops) for r in in_memory.layers}
    chosen = {t.name: t.representation for t in streamed.tensors}
    assert chosen == {t.name: t.representation for t in in_memory.tensors}
    assert chosen["model.layers.1.mlp.down_proj.weight"] == "block 4x4"  # the rule's choice, from streamed tilings
    assert chosen["model.layers.0.mlp.up_proj.weight"] == "masked" and chosen["lm_head.weight"] == "dense"
    up = next(r for r in streamed.layers if r.name == "model.layers.0.mlp.up_proj")
    assert up.nonzeros == int(torch.count_nonzero(model.model.layers[0].mlp.up_proj.weight)) < up.params
    assert not any("density is unknown" in w for w in streamed.warnings)


def test_declared_widths_are_audited_against_the_streamed_values(tmp_path):
    model, directory = _llama(tmp_path)
    streamed = measure_directory(directory, CountOptions(bits=4), progress=False)
    violations = {v.tensor for v in audit(model, bits=4).violations}
    named = {w.split(":")[1].strip() for w in streamed.warnings if w.startswith("audit: ")}
    assert "model.layers.1.self_attn.q_proj.weight" not in violations  # on its 4-bit grid: holds
    assert named == violations and len(named) > 5
    with pytest.raises(ms.MicronetError, match="declared width"):
        measure_directory(directory, CountOptions(bits=4, strict=True), progress=False)


def _llama_size(c: dict) -> tuple[int, int, int]:
    """(parameters, weights of the linear layers, rotary frequencies) of a Llama from its configuration, by hand."""
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    linear_per_layer = h * h + 2 * h * kv + h * h + 3 * h * i
    linear = n * linear_per_layer + v * h  # + the output projection
    rotary = h // c["num_attention_heads"] // 2  # the rotary frequencies: an fp32 buffer the forward reads
    return linear + v * h + n * 2 * h + h, linear, rotary


@pytest.mark.parametrize(("dtype", "bits"), [("float32", 32), ("bfloat16", 16)])
def test_shape_only_on_a_directory_with_only_its_configuration(tmp_path, dtype, bits):
    config = dict(LLAMA, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype=dtype)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["count", str(tmp_path), "--shape-only", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    params, linear, rotary = _llama_size(config)
    assert report["params"] == params * bits / 32 + rotary  # dense, every value at its dtype's width
    h, n = config["hidden_size"], config["num_hidden_layers"]
    dots = next(o for o in report["ops"] if o["family"] == "dot_product")
    assert dots["mults"] == TOKENS * linear + n * 2 * TOKENS * TOKENS * h  # projections, then q.k and p.v per head
    assert any("no safetensors weights" in w for w in report["warnings"])


def test_cli_stream_matches_the_library_and_refuses_what_it_cannot_count(tmp_path):
    model, directory = _llama(tmp_path)
    result = CliRunner().invoke(app, ["count", str(directory), "--stream", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["flops"] == measure_directory(directory, CountOptions(), progress=False).flops
    single = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(2)}, single)
    result = CliRunner().invoke(app, ["count", str(single), "--stream"])
    assert result.exit_code == 2 and "model directory" in result.output

    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["count", str(directory), "--stream"])
    assert result.exit_code == 2 and "'gptq'" in result.output and "error:" in result.output


def test_files_that_do_not_fit_the_architecture_fail_with_one_clear_error(tmp_path):
    _, directory = _llama(tmp_path, shard="10MB")
    (file,) = weight_files(directory)
    tensors = {t.name: t for t in read_header(file)}
    assert "lm_head.weight" in tensors
    from safetensors.torch import load_file

    state = load_file(file)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ms.MicronetError, match="narrower format: model.layers.0.mlp.up_proj.weight"):
        measure_directory(directory, CountOptions(), progress=False)
    del state["model.layers.0.mlp.up_proj.weight"]
    state["extra.weight"] = torch.ones(3)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ms.MicronetError, match="not in the architecture of its config.json: extra.weight"):
        measure_directory(directory, CountOptions(), progress=False)
    del state["extra.weight"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ms.MicronetError, match="not in the files: model.layers.0.mlp.up_proj.weight"):
        measure_directory(directory, CountOptions(), progress=False)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ms.MicronetError, match="safetensors"):
        measure_directory(directory, CountOptions(), progress=False)


def test_a_directory_whose_weights_exceed_the_memory_budget_is_streamed_without_asking(tmp_path, monkeypatch):
    _, directory = _llama(tmp_path)
    monkeypatch.setattr("micronet_score.streamed_count.memory_budget", lambda: 1000)  # bytes
    result = CliRunner().invoke(app, ["count", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["flops"] == measure_directory(directory, CountOptions(), progress=False).flops


def test_a_configuration_without_a_vocabulary_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    result = CliRunner().invoke(app, ["count", str(tmp_path), "--shape-only"])
    assert result.exit_code == 2 and "(vit) has no vocabulary" in result.output


def test_an_architecture_transformers_cannot_build_stops_the_reading_with_one_error(tmp_path):
    _, directory = _llama(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["num_attention_heads"] = 5  # does not divide hidden_size 64
    (directory / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["count", str(directory), "--stream"])
    assert result.exit_code == 2 and "error:" in result.output and "transformers cannot" in result.output


@pytest.mark.parametrize("representation", ["dense", "masked", "block"])
def test_a_forced_representation_counts_the_same_from_the_files(tmp_path, representation):
    model, directory = _llama(tmp_path)
    streamed = measure_directory(directory, CountOptions(representation=representation), progress=False)
    in_memory = ms.count(model, torch.zeros((1, TOKENS), dtype=torch.long), representation=representation)
    assert _totals(streamed) == pytest.approx(_totals(in_memory), rel=1e-12)
    assert {t.name: t.representation for t in streamed.tensors} == {t.name: t.representation for t in in_memory.tensors}
