"""A sweep of Hugging Face architectures built from tiny configs with random weights.

Each model is counted once: no op may be uncounted, no count negative, and the multiplies of its dot products
must equal a formula written by hand from the architecture (a dot product of length n is n mults).
Shapes: hidden E = 32, L = 2 layers, H = 4 heads, feed-forward FF = 64, vocabulary V = 100, T = 8 tokens
(decoders of encoder-decoder models: 5 tokens).
"""

from __future__ import annotations

import pytest
import torch

import micronet_score as ms

tf = pytest.importorskip("transformers")

E, L, H, FF, V, T, TD = 32, 2, 4, 64, 100, 8, 5
IDS = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(0, V, (1, TD), generator=torch.Generator().manual_seed(1))
IMAGE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def count(model, *inputs, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        report = ms.count(model.eval(), *inputs, samples=1, strict=True, **kwargs)
    for row in [*report.layers, *report.ops]:
        assert min(row.mults, row.adds, row.others, row.flops) >= 0, row
    return report


def encoder_layers(t: int) -> int:
    """Dot-product mults of L post-attention encoder layers of t tokens: q, k, v, o projections (4 t E^2), scores
    and weighted values (2 t^2 E), the feed-forward (2 t E FF)."""
    return L * (4 * t * E * E + 2 * t * t * E + 2 * t * E * FF)


def decoder_layers(t: int, s: int, inner: int = E) -> int:
    """L decoder layers of t tokens over s encoded ones: self-attention, cross-attention (q, o over t; k, v over
    s), the feed-forward."""
    self_attention = 4 * t * E * inner + 2 * t * t * inner
    cross = 2 * t * E * inner + 2 * s * E * inner + 2 * t * s * inner
    return L * (self_attention + cross + 2 * t * E * FF)


def llama_layers(kv_heads: int, mlp: int) -> int:
    """L Llama-style layers: q and o (2 T E^2), k and v with grouped heads (2 T E kv d), scores and values (2 T^2
    E), and the mlp's dot products per token."""
    d = E // H
    return L * (2 * T * E * E + 2 * T * E * kv_heads * d + 2 * T * T * E + T * mlp)


def test_gpt2():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=E, n_layer=L, n_head=H, vocab_size=V, n_positions=64, **TOKENS))
    # c_attn 3 T E^2, c_proj T E^2, mlp 8 T E^2, attention 2 T^2 E per layer; the tied head T E V
    report = count(model, IDS)
    assert report.family("dot_product").mults == L * (12 * T * E * E + 2 * T * T * E) + T * E * V


def test_gpt2_eager_and_sdpa_blocks_cost_the_same():
    config = {"n_embd": E, "n_layer": L, "n_head": H, "vocab_size": V, "n_positions": 64, **TOKENS}
    torch.manual_seed(0)
    sdpa = tf.GPT2LMHeadModel(tf.GPT2Config(**config, attn_implementation="sdpa"))
    eager = tf.GPT2LMHeadModel(tf.GPT2Config(**config, attn_implementation="eager"))
    eager.load_state_dict(sdpa.state_dict())
    a, b = count(sdpa, IDS), count(eager, IDS)
    blocks = [row.name for row in a.layers if row.name.startswith("transformer.h.")]
    assert blocks
    for name in blocks:
        x, y = a.layer(name), b.layer(name)
        assert (x.mults, x.adds, x.others) == (y.mults, y.adds, y.others), name


def test_bert():
    model = tf.BertModel(
        tf.BertConfig(hidden_size=E, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF, vocab_size=V)
    )
    # the pooler: one dense layer on the first token
    assert count(model, IDS).family("dot_product").mults == encoder_layers(T) + E * E


def test_llama():
    config = tf.LlamaConfig(
        hidden_size=E, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2, intermediate_size=FF,
        vocab_size=V, **TOKENS,
    )  # fmt: skip
    # gate, up and down projections: 3 E FF per token; the head T E V
    report = count(tf.LlamaForCausalLM(config), IDS)
    assert report.family("dot_product").mults == llama_layers(2, 3 * E * FF) + T * E * V


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
def test_mixtral_each_experts_implementation(experts):
    config = tf.MixtralConfig(
        hidden_size=E, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2, intermediate_size=FF,
        vocab_size=V, num_local_experts=4, num_experts_per_tok=2, **TOKENS,
    )  # fmt: skip
    config._experts_implementation = experts
    report = count(tf.MixtralForCausalLM(config), IDS)
    # the router scores 4 experts per token (E x 4); each token runs its 2 experts' gate, up and down (3 E FF each)
    assert report.family("dot_product").mults == llama_layers(2, 4 * E + 2 * 3 * E * FF) + T * E * V
    # routing is priced: the top-2 of 4 router logits per token, 2 (4 - 1) comparisons
    assert report.family("top_k").others == L * T * 2 * 3


def test_t5():
    config = tf.T5Config(d_model=E, d_kv=8, num_heads=H, d_ff=FF, num_layers=L, num_decoder_layers=L, vocab_size=V)
    report = count(tf.T5Model(config), IDS, decoder_input_ids=DEC)
    assert report.family("dot_product").mults == encoder_layers(T) + decoder_layers(TD, T)


def test_bart():
    config = tf.BartConfig(
        d_model=E, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H, decoder_attention_heads=H,
        encoder_ffn_dim=FF, decoder_ffn_dim=FF, vocab_size=V, max_position_embeddings=64, **TOKENS,
    )  # fmt: skip
    report = count(tf.BartModel(config), IDS, decoder_input_ids=DEC)
    assert report.family("dot_product").mults == encoder_layers(T) + decoder_layers(TD, T)


PATCHES = (32 // 8) ** 2


def test_vit():
    config = tf.ViTConfig(
        hidden_size=E, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF, image_size=32, patch_size=8
    )
    # the patch embedding (a convolution of 3 x 8 x 8 taps per patch and channel), 16 patches + [CLS], the pooler
    expected = PATCHES * E * 3 * 64 + encoder_layers(PATCHES + 1) + E * E
    assert count(tf.ViTModel(config), IMAGE).family("dot_product").mults == expected


def test_clip_vision():
    config = tf.CLIPVisionConfig(
        hidden_size=E, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF, image_size=32, patch_size=8
    )
    expected = PATCHES * E * 3 * 64 + encoder_layers(PATCHES + 1)
    assert count(tf.CLIPVisionModel(config), IMAGE).family("dot_product").mults == expected


def test_mamba():
    inner, state, kernel, rank = 2 * E, 8, 4, 2
    config = tf.MambaConfig(
        hidden_size=E, state_size=state, num_hidden_layers=L, vocab_size=V, expand=2, conv_kernel=kernel,
        time_step_rank=rank, **TOKENS,
    )  # fmt: skip
    # per layer: in_proj (E -> 2 inner), the depthwise causal conv (padded by kernel - 1 on both sides, then cut:
    # T + kernel - 1 positions computed), x_proj (inner -> rank + 2 state), dt_proj (rank -> inner), the scan's
    # C h per step (inner x state), out_proj (inner -> E)
    per_layer = (
        T * E * 2 * inner + (T + kernel - 1) * inner * kernel + T * inner * (rank + 2 * state) + T * rank * inner
        + T * inner * state + T * inner * E
    )  # fmt: skip
    assert count(tf.MambaModel(config), IDS).family("dot_product").mults == L * per_layer


def test_whisper():
    mel, frames = 8, 16
    config = tf.WhisperConfig(
        d_model=E, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H, decoder_attention_heads=H,
        encoder_ffn_dim=FF, decoder_ffn_dim=FF, vocab_size=V, num_mel_bins=mel, max_source_positions=frames,
        max_target_positions=32, decoder_start_token_id=1, **TOKENS,
    )  # fmt: skip
    features = torch.randn(1, mel, 2 * frames, generator=torch.Generator().manual_seed(3))
    report = count(tf.WhisperModel(config), features, decoder_input_ids=DEC)
    # conv1 (mel -> E, kernel 3) over 2 x frames, conv2 (E -> E, kernel 3, stride 2) over frames
    convs = 2 * frames * E * mel * 3 + frames * E * E * 3
    assert report.family("dot_product").mults == convs + encoder_layers(frames) + decoder_layers(TD, frames)
