"""Your own model, in every form a checkpoint takes, through the loader and the commands.

The reference is always the same model counted in Python (``micronet_score.count`` on the module itself) and,
for the CNN, a count derived by hand from the rule set.
"""

import importlib.util
import json
import math

import pytest
import torch
from own_models import LSTMLM, Bidirectional, Block, CausalLM, SmallCNN
from safetensors.torch import save_file

import micronet_score as ms
from micronet_score.checkpoint import load_model
from micronet_score.errors import MicronetError
from micronet_score.options import CountOptions
from micronet_score.scoring import measure_example

KINDS = {
    # kind: (factory, its arguments, --input, the same input built here)
    "cnn": ("own_models:SmallCNN", {"width": 8}, "1x3x32x32", lambda: torch.zeros(1, 3, 32, 32)),
    "transformer": ("own_models:Block", {"dim": 16, "heads": 2}, "1x12x16", lambda: torch.zeros(1, 12, 16)),
    "lstm": ("own_models:LSTMLM", {"vocab": 50, "dim": 16}, "ids:1x12", lambda: torch.arange(12)[None] % 50),
}
CLASSES = {"cnn": SmallCNN, "transformer": Block, "lstm": LSTMLM}


def _model(kind):
    torch.manual_seed(0)
    model = CLASSES[kind](**KINDS[kind][1])
    for module in model.modules():  # batch norm with statistics of its own, not the initial ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def _save(form, model, folder):
    """The model saved in one form; returns (path, load_model keyword arguments)."""
    factory, args = {SmallCNN: KINDS["cnn"], Block: KINDS["transformer"], LSTMLM: KINDS["lstm"]}[type(model)][:2]
    own = {"model": factory, "model_args": json.dumps(args)}
    state = model.state_dict()
    if form == "state dict":
        torch.save(state, folder / "model.pt")
        return folder / "model.pt", own
    if form == "training checkpoint":
        torch.save({"net": state, "step": 100}, folder / "train.pt")
        return folder / "train.pt", own
    if form == "safetensors":
        save_file(state, folder / "model.safetensors")
        return folder / "model.safetensors", own
    if form == "sharded safetensors":
        names = list(state)
        shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, folder / shard)
        index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return folder / "model.safetensors.index.json", own
    if form == ".pt2":
        example = {SmallCNN: KINDS["cnn"], Block: KINDS["transformer"], LSTMLM: KINDS["lstm"]}[type(model)][3]()
        torch.export.save(torch.export.export(model, (example,)), folder / "model.pt2")
        return folder / "model.pt2", {}
    if form == "pickled module":
        torch.save(model, folder / "whole.pt")
        return folder / "whole.pt", {"trust_pickle": True}
    raise AssertionError(form)


def _rows(report):
    return [(r.name, r.params, r.nonzeros, r.storage, r.mults, r.adds, r.others, r.flops) for r in report.layers]


def _same(report, reference):
    assert report.params == pytest.approx(reference.params, rel=1e-12)
    assert report.flops == pytest.approx(reference.flops, rel=1e-12)
    assert _rows(report) == _rows(reference)  # name, params, nonzeros, storage, mults, adds, others, operations
    assert not report.uncounted


FORMS = ["state dict", "training checkpoint", "safetensors", "sharded safetensors", ".pt2", "pickled module"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("form", FORMS)
def test_every_form_counts_as_the_module_itself(kind, form, tmp_path):
    model = _model(kind)
    path, how = _save(form, model, tmp_path)
    loaded = load_model(path, **how)
    inputs = None if form == ".pt2" else [KINDS[kind][2]]  # a program counts on the inputs it was exported with
    report = measure_example(loaded, CountOptions(), inputs=inputs)
    _same(report, ms.count(model, KINDS[kind][3]()))
    # the weights are the saved ones: the loaded model computes what the original does
    with torch.no_grad():
        ours, theirs = loaded.model(KINDS[kind][3]()), model(KINDS[kind][3]())
    ours, theirs = (ours[0], theirs[0]) if isinstance(ours, tuple) else (ours, theirs)
    torch.testing.assert_close(ours, theirs)


def test_the_cnn_equals_a_count_by_hand(tmp_path):
    """SmallCNN(width 8) on one 3x32x32 image, priced by hand from rules/micronet-2019.toml: a convolution output
    is k MACs (k mults, k - 1 adds); batch norm after a convolution folds into it (its shift stays: one add per
    element and one stored bias per channel); ReLU is one op per element; the residual one add; the global mean
    n - 1 adds and one division per channel; the classifier 8 MACs per output, its bias the eighth add."""
    w, hw = 8, 32 * 32
    mults = w * hw * 27 + w * hw * 72 + w * hw + w + 10 * 8  # conv1, conv2, relu, mean's divisions, fc
    adds = w * hw * 26 + w * hw * 71 + 2 * w * hw + w * hw + w * (hw - 1) + 10 * 8  # ..., 2 bn shifts, residual
    params = 3 * 9 * w + w * 9 * w + 2 * w + (w * 10 + 10)  # conv weights, bn shifts (folded), fc
    path, how = _save("safetensors", _model("cnn"), tmp_path)
    report = measure_example(load_model(path, **how), CountOptions(), inputs=["1x3x32x32"])
    assert (report.mults, report.adds, report.others) == (mults, adds, 0)
    assert report.flops == mults + adds and report.params == params


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _hf_models(transformers):
    torch.manual_seed(0)
    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return {"resnet": (resnet.eval(), "1x3x32x32", torch.zeros(1, 3, 32, 32)),
            "llama": (llama.eval(), "ids:1x12", torch.arange(12)[None])}


@pytest.mark.parametrize("name", ["resnet", "llama"])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hugging_face_directory(transformers, name, weights, tmp_path):
    model, spec, example = _hf_models(transformers)[name]
    if weights == "safetensors":
        model.save_pretrained(tmp_path)
    else:  # a config that does not name its class: the class whose keys the weights have is found
        assert model.config.architectures is None
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path)
    assert loaded.name == type(model).__name__
    report = measure_example(loaded, CountOptions(), inputs=[spec])
    _same(report, ms.count(model, example))
    with torch.no_grad():
        ours, theirs = loaded.model(example), model(example)
    torch.testing.assert_close(ours.logits, theirs.logits)


def test_hugging_face_model_builds_on_the_meta_device(transformers, tmp_path):
    from micronet_score.sources.huggingface import build_model

    model = _hf_models(transformers)["llama"][0]
    model.save_pretrained(tmp_path)
    meta = build_model(tmp_path, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())


def test_without_transformers_the_error_names_the_extra(transformers, tmp_path, monkeypatch):
    _hf_models(transformers)["llama"][0].save_pretrained(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MicronetError, match=r"pip install 'micronet-score\[hf\]'"):
        load_model(tmp_path)


def test_safetensors_are_listed_without_loading(tmp_path):
    from micronet_score.sources.safetensors_io import SafetensorsWeights

    path, _ = _save("sharded safetensors", _model("lstm"), tmp_path)
    weights = SafetensorsWeights(path)
    entries = weights.entries()
    assert entries["out.weight"].shape == (50, 16) and entries["out.weight"].dtype == "F32"
    assert {e.file.name for e in entries.values()} == {"a.safetensors", "b.safetensors"}
    assert set(weights) == set(_model("lstm").state_dict())


# --- the command line --------------------------------------------------------------------------------------


def _json(cli, *args):
    code, out, err = cli(*args)
    assert code == 0, err
    return json.loads(out)


def test_commands_on_your_own_model(cli, tmp_path):
    model = _model("cnn")
    path, how = _save("safetensors", model, tmp_path)
    own = ["--model", how["model"], "--model-args", how["model_args"]]
    reference = ms.count(model, torch.zeros(1, 3, 32, 32))
    counted = _json(cli, "count", str(path), *own, "--input", "1x3x32x32", "--json")
    assert counted["flops"] == reference.flops and counted["params"] == reference.params
    rows = _json(cli, "breakdown", str(path), *own, "--input", "1x3x32x32", "--format", "json")["rows"]
    assert {r["name"]: r["flops"] for r in rows} == {r.name: r.flops for r in reference.layers}
    # the image track's input shape is the example input when no --input is given
    on_track = _json(cli, "count", str(path), *own, "--track", "cifar100", "--json")
    assert on_track["flops"] == reference.flops and on_track["score"] > 0
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(path.read_bytes())
    compared = _json(cli, "compare", str(path), str(twin), *own, "--input", "1x3x32x32", "--json")
    assert [r["flops"] for r in compared.values()] == [reference.flops] * 2
    code, out, err = cli("audit", str(path), *own, "--bits", "32")
    assert code == 0, err
    if importlib.util.find_spec("plotly") is not None:  # the report extra
        code, _, err = cli("report", str(path), *own, "--input", "1x3x32x32", "-o", str(tmp_path / "r.html"))
        assert code == 0 and (tmp_path / "r.html").stat().st_size > 0, err


def test_several_inputs(cli, tmp_path):
    from own_models import TwoInputs

    torch.save(TwoInputs().state_dict(), tmp_path / "two.pt")
    report = _json(cli, "count", str(tmp_path / "two.pt"), "--model", "own_models:TwoInputs",
                   "--input", "2x4", "--input", "2x5", "--json")
    assert report["samples"] == 2 and report["mults"] == (4 * 3 + 5 * 3)  # per sample: both linears' MACs


def test_example_input_follows_the_rule_files_input_shape(cli, tmp_path):
    from importlib import resources

    text = (resources.files("micronet_score.rules") / "micronet-2019.toml").read_text()
    assert "input_shape = [1, 3, 32, 32]" in text
    rules = tmp_path / "small.toml"
    rules.write_text(text.replace("input_shape = [1, 3, 32, 32]", "input_shape = [1, 3, 16, 16]"))
    path, how = _save("state dict", _model("cnn"), tmp_path)
    own = ["--model", how["model"], "--model-args", how["model_args"], "--track", "cifar100", "--json"]
    report = _json(cli, "count", str(path), *own, "--rules", str(rules))
    assert report["layers"][1]["name"] == "conv1" and report["layers"][1]["mults"] == 8 * 16 * 16 * 27


def test_model_without_a_known_input_says_how_to_give_one(cli, tmp_path):
    path, how = _save("pickled module", _model("transformer"), tmp_path)
    code, _, err = cli("count", str(path), "--trust-pickle")
    err = " ".join(err.split())
    assert code == 2 and "--input 1x3x32x32" in err and "--input ids:1x128" in err and "--data" in err


# --- errors that point the right way -------------------------------------------------------------------------


def test_text_file_is_not_a_pytorch_checkpoint(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("these are my notes\n")
    code, _, err = cli("count", str(tmp_path / "notes.txt"))
    assert code == 2 and "not a PyTorch checkpoint" in err and "pickle" not in err


def test_unknown_track_lists_the_tracks(cli, tmp_path):
    path, how = _save("state dict", _model("cnn"), tmp_path)
    code, _, err = cli("count", str(path), "--model", how["model"], "--track", "cifar10")
    err = " ".join(err.split())
    assert code == 2 and "unknown track 'cifar10'" in err and "cifar100" in err and "invalid rule set" not in err


def test_model_option_that_a_file_ignores_is_an_error(cli, tmp_path):
    path, _ = _save("pickled module", _model("cnn"), tmp_path)
    code, _, err = cli("count", str(path), "--trust-pickle", "--model", "own_models:SmallCNN")
    assert code == 2 and "does not apply" in err


def test_unrecognised_state_dict_lists_the_ways_to_name_it(cli, tmp_path):
    path, _ = _save("state dict", _model("cnn"), tmp_path)
    code, _, err = cli("count", str(path))
    err = " ".join(err.split())
    assert code == 2 and "--model package.module:factory" in err and "--model-args" in err
    assert "Hugging Face" in err and ".pt2" in err and "--trust-pickle" in err


def test_directory_that_is_no_model_directory(cli, tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")  # weights without config.json
    code, _, err = cli("count", str(tmp_path))
    assert code == 2 and "Hugging Face model directory" in " ".join(err.split())


def test_thousands_of_mismatched_keys_in_one_short_message(tmp_path):
    state = {f"extra.{i}": torch.zeros(1) for i in range(3000)}
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(MicronetError) as err:
        load_model(tmp_path / "wrong.pt", model="own_models:SmallCNN")
    text = str(err.value)
    assert "3000 unexpected: extra.0, extra.1, extra.2, extra.3, extra.4 and 2995 more" in text
    assert "14 missing: conv1.weight [8, 3, 3, 3]" in text and len(text) < 700


def test_factory_errors(tmp_path):
    path, _ = _save("state dict", _model("cnn"), tmp_path)
    with pytest.raises(MicronetError, match="no module 'nowhere_at_all'"):
        load_model(path, model="nowhere_at_all:Net")
    with pytest.raises(MicronetError, match="has no 'Missing'"):
        load_model(path, model="own_models:Missing")
    with pytest.raises(MicronetError, match="not valid JSON"):
        load_model(path, model="own_models:SmallCNN", model_args="{width: 8}")


# --- eval of your own language model --------------------------------------------------------------------------

WORDS = "the cat sat on a mat and dog ran to park while bird sang".split()


def _corpus(folder, vocab_size):
    """A WikiText-style directory whose vocabulary (by frequency in train) has ``vocab_size`` words."""
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    words = WORDS[: vocab_size - 1]  # with <eos>, the words of each line's end
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        ids = torch.randint(0, len(words), (n,), generator=g).tolist()
        text = " ".join(words[i] for i in ids)
        (folder / f"wiki.{split}.tokens").write_text(" " + " ".join(words) + " \n" + text + " \n")
    from micronet_score.data.wikitext import load_split, load_vocabulary

    vocab = load_vocabulary(folder, cache_dir=folder / "cache")
    assert len(vocab) == vocab_size
    return torch.as_tensor(load_split(folder, "test", vocab, cache_dir=folder / "cache"))


def _perplexity(cli, path, data, *args):
    report = _json(cli, "eval", str(path), "--data", str(data), "--track", "wikitext103", "--json", *args)
    return report


def test_stateful_lm_perplexity_equals_a_per_token_loop(cli, tmp_path):
    vocab = 12
    tokens = _corpus(tmp_path / "data", vocab)
    torch.manual_seed(0)
    model = LSTMLM(vocab=vocab, dim=8).eval()
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    total, state = 0.0, None
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            logits, state = model(tokens[None, t: t + 1], state)
            total -= torch.log_softmax(logits[0, -1], -1)[tokens[t + 1]].item()
    report = _perplexity(cli, tmp_path / "lm.pt", tmp_path / "data", "--model", "own_models:LSTMLM",
                         "--model-args", json.dumps({"vocab": vocab, "dim": 8}))
    n = len(tokens) - 1
    assert report["samples"] == n and report["quality"]["value"] == pytest.approx(math.exp(total / n), rel=1e-5)
    # per token: the model's forward over the stream (one chunk) and one log-softmax over the vocabulary, whose
    # price the rule set gives as V exp, V - 1 adds, 1 log and V subtractions
    forward = ms.count(model, tokens[None, :n], samples=n).flops
    assert report["flops"] == pytest.approx(forward + 3 * vocab, rel=1e-9)


def test_stateless_lm_context_restarts_every_window(cli, tmp_path):
    vocab, window = 12, 8
    tokens = _corpus(tmp_path / "data", vocab)
    torch.manual_seed(0)
    model = CausalLM(vocab=vocab, dim=16, context=window).eval()
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    total = 0.0
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            start = t // window * window  # the window this prediction falls in: its context
            logits = model(tokens[None, start: t + 1])
            total -= torch.log_softmax(logits[0, -1], -1)[tokens[t + 1]].item()
    args = ["--model", "own_models:CausalLM", "--model-args", json.dumps({"vocab": vocab, "context": window})]
    report = _perplexity(cli, tmp_path / "lm.pt", tmp_path / "data", *args)
    assert report["quality"]["value"] == pytest.approx(math.exp(total / (len(tokens) - 1)), rel=1e-5)


def test_exported_lm_of_one_length_is_fed_padded_windows(cli, tmp_path):
    """A .pt2 exported for ids [1, T] (static shape): windows of T tokens, the last one padded after its tokens;
    the perplexity is the window-restarting loop's, and each window's whole forward is charged."""
    vocab, window = 12, 7
    tokens = _corpus(tmp_path / "data", vocab)
    torch.manual_seed(0)
    model = CausalLM(vocab=vocab, dim=16, context=window).eval()
    program = torch.export.export(model, (torch.zeros(1, window, dtype=torch.long),))
    torch.export.save(program, tmp_path / "lm.pt2")
    n = len(tokens) - 1
    assert n % window != 0  # the last window is a padded one
    total = 0.0
    with torch.no_grad():
        for t in range(n):
            start = t // window * window
            logits = model(tokens[None, start: t + 1])
            total -= torch.log_softmax(logits[0, -1], -1)[tokens[t + 1]].item()
    report = _perplexity(cli, tmp_path / "lm.pt2", tmp_path / "data")
    assert report["quality"]["value"] == pytest.approx(math.exp(total / n), rel=1e-5)
    # every window runs the whole program (ceil(n / T) forwards), and each prediction one log-softmax (3 V)
    forward = ms.count(model, torch.zeros(1, window, dtype=torch.long), samples=1).flops
    assert report["flops"] == pytest.approx((math.ceil(n / window) * forward + 3 * vocab * n) / n, rel=1e-9)


def test_hugging_face_lm_with_its_cache_equals_a_full_context_loop(transformers, cli, tmp_path):
    vocab = 12
    tokens = _corpus(tmp_path / "data", vocab)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    assert len(tokens) <= 128  # the whole stream fits the positions: every prediction sees all tokens before it
    total = 0.0
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            logits = model(tokens[None, : t + 1]).logits
            total -= torch.log_softmax(logits[0, -1], -1)[tokens[t + 1]].item()
    report = _perplexity(cli, tmp_path / "gpt2", tmp_path / "data")
    assert report["quality"]["value"] == pytest.approx(math.exp(total / (len(tokens) - 1)), rel=1e-5)


def test_a_model_that_sees_the_future_is_refused(cli, tmp_path):
    _corpus(tmp_path / "data", 12)
    torch.save(Bidirectional(vocab=12).state_dict(), tmp_path / "lm.pt")
    code, _, err = cli("eval", str(tmp_path / "lm.pt"), "--data", str(tmp_path / "data"), "--track", "wikitext103",
                       "--model", "own_models:Bidirectional", "--model-args", '{"vocab": 12}')
    assert code == 2 and "online protocol" in " ".join(err.split())


def test_eval_of_your_own_image_model(cli, tmp_path):
    from test_images import cifar_pickle, planted

    from micronet_score.data.images import load_cifar100_test

    labels, right = planted(12, 4)
    labels[:5] = 7  # the model below favours class 7: some answers are right
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "test").write_bytes(cifar_pickle(labels, right))
    torch.manual_seed(0)
    model = SmallCNN(width=8, classes=100).eval()
    with torch.no_grad():
        model.fc.bias[7] += 10.0
    save_file(model.state_dict(), tmp_path / "cnn.safetensors")
    report = _json(cli, "eval", str(tmp_path / "cnn.safetensors"), "--model", "own_models:SmallCNN",
                   "--model-args", '{"classes": 100}', "--data", str(tmp_path / "cifar"), "--track", "cifar100",
                   "--json")
    # the reference: the model run directly on the decoded, normalised images
    batch, batch_labels = next(load_cifar100_test(tmp_path / "cifar").batches(12))
    with torch.no_grad():
        correct = int((model(batch).argmax(-1) == batch_labels).sum())
    assert report["quality"]["value"] == correct >= 5 and report["samples"] == 12
    assert report["flops"] == pytest.approx(ms.count(model, torch.zeros(1, 3, 32, 32)).flops)
