"""Loading the authors' files (and micronet-score's own) into mit-lm."""

import pytest
import torch
import yaml
from _mit_reference import TINY, authors_keys, random_state_dict
from micronet_score.models.mit_lm import BEST_CACHE_LAMBDA

from micronet_score.checkpoint import load_checkpoint, load_model, save_checkpoint
from micronet_score.errors import MicronetError

FULL = dict(n_layers=8, n_embed=256, n_embeds=[256, 64, 4], cutoffs=[3500, 25000], n_vocab=267735, n_head=8,
            n_k=24, n_v=24, n_inner=768, n_seq=96)
AUTHORS_YAML = """bits: 9
cache_lambda: 0.15391452339546033
cache_theta: 0.02021162425847724
compress: distiller_quantize.yaml
cutoffs:
- 3500
- 25000
dropout: 0
eval_batch: 1
eval_chunk: 4032
lr: 0.0001
model: quantize.Transformer
n_cache: 3000
n_embed: 256
n_embeds:
- 256
- 64
- 4
n_head: 8
n_inner: 768
n_k: 24
n_layers: 8
n_seq: 96
n_v: 24
n_vocab: 267735
opt_level: O0
pos_emb: trained
steps: 1
use_cache: true
"""


def test_full_configuration_225_keys_load_and_infer(tmp_path):
    keys = authors_keys(FULL)
    assert len(keys) == 225
    sd = {k: torch.empty(shape) for k, shape in keys}
    path = tmp_path / "model-1.pth"
    torch.save({"net": sd, "step": 1}, path)
    (tmp_path / "config.yaml").write_text(AUTHORS_YAML)
    loaded = load_model(path, config=tmp_path / "config.yaml")
    cfg = loaded.config
    assert loaded.name == "mit-lm" and loaded.meta["step"] == 1
    assert {k: cfg[k] for k in FULL} == FULL
    assert cfg["quantized"] and not cfg["cache_params"] and cfg["n_cache"] == 3000 and cfg["bits"] == 9
    assert list(loaded.model.state_dict()) == [k for k, _ in keys]
    assert sum(p.numel() for p in loaded.model.parameters()) == 8_304_213


def test_inference_without_config_file_and_float_flavour(tmp_path):
    """A model.Transformer file: no quantizer buffers, trained cache scalars; a raw state dict."""
    sd = {k: torch.zeros(s) for k, s in authors_keys(TINY, quantized=False, cache_params=True)}
    sd["loss.cache_lambda_inv_sigmoid"] = torch.tensor(0.0)
    sd["loss.cache_theta_inv_softplus"] = torch.tensor(0.016).expm1().log()
    torch.save(sd, tmp_path / "raw.pth")
    loaded = load_model(tmp_path / "raw.pth", overrides={"n_cache": 7})
    cfg = loaded.config
    assert not cfg["quantized"] and cfg["cache_params"] and cfg["n_cache"] == 7
    assert cfg["n_head"] == 2 and cfg["n_seq"] == 5 and cfg["cutoffs"] == [20, 50] and cfg["n_vocab"] == 100
    theta, lam = loaded.model.loss.theta_lambda()
    assert lam == pytest.approx(0.5) and theta == pytest.approx(0.016)


def test_quantizer_buffers_of_shape_one_load(tmp_path):
    sd = random_state_dict(TINY)
    assert sd["quant.max_abs"].shape == (1,)
    torch.save({"net": sd, "step": 1}, tmp_path / "m.pth")
    model = load_model(tmp_path / "m.pth", overrides={"cache_theta": 0.3}).model
    assert model.quant.max_abs.shape == () and model.quant.max_abs.item() == sd["quant.max_abs"].item()
    assert model.loss.theta_lambda() == (0.3, BEST_CACHE_LAMBDA)


def test_bad_keys_give_one_error_listing_all(tmp_path):
    sd = random_state_dict(TINY)
    del sd["layers.1.quant_attn.inv_scale"]
    sd["layers.0.extra"] = torch.zeros(1)
    sd["layers.0.out.weight"] = torch.zeros(16, 9)
    torch.save({"net": sd, "step": 1}, tmp_path / "bad.pth")
    with pytest.raises(MicronetError) as err:
        load_model(tmp_path / "bad.pth", model="mit-lm")
    msg = str(err.value)
    assert "1 missing: layers.1.quant_attn.inv_scale" in msg
    assert "1 unexpected: layers.0.extra" in msg
    assert "layers.0.out.weight [16, 9] (expected [16, 8])" in msg


def test_config_that_contradicts_shapes_is_an_error(tmp_path):
    torch.save(random_state_dict(TINY), tmp_path / "m.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"n_layers": 3, "lr": 0.1}))
    with pytest.raises(MicronetError, match="n_layers = 3 but the checkpoint's shapes say 2"):
        load_model(tmp_path / "m.pth", config=tmp_path / "config.yaml")
    with pytest.raises(MicronetError, match="unknown settings"):
        load_model(tmp_path / "m.pth", overrides={"nonsense": 1})


def test_missing_and_unsafe_files(tmp_path):
    with pytest.raises(MicronetError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MicronetError, match="junk.pth"):
        load_model(tmp_path / "junk.pth")
    torch.save({"net": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(MicronetError, match="would run code from the file.*--trust-pickle"):
        load_model(tmp_path / "evil.pth")


def test_micronet_checkpoint_roundtrip(tmp_path):
    loaded = load_model(_saved(tmp_path), overrides={"cache_theta": 0.3, "cache_lambda": 0.2})
    path = save_checkpoint(tmp_path / "ours.pt", "mit-lm", loaded.config, loaded.model.state_dict(), {"note": "x"})
    ckpt = load_checkpoint(path)
    assert ckpt.model == "mit-lm" and ckpt.meta == {"note": "x"} and ckpt.config["cache_theta"] == 0.3
    torch.load(path, weights_only=True)
    again = load_model(path)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert again.config == loaded.config


class Evil:
    """Not a tensor: a weights_only load must refuse it."""


def _saved(tmp_path):
    path = tmp_path / "authors.pth"
    torch.save({"net": random_state_dict(TINY), "step": 1}, path)
    return path
