"""Hostile input, second round (issue 12, items 3-8): every case is a file generated here, run through the real
command line, and must end in one clear line with exit code 2 (130 for Ctrl-C), within bounded memory and time.

Memory bombs run the CLI in a subprocess under ``RLIMIT_AS`` (address space; torch itself needs about 1 GB of it)
and a timeout: before the fixes each of them allocated gigabytes (or ran until killed).
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from micronet_score.models import registry
from micronet_score.models.mit_lm import demo_paths

from micronet_score.checkpoint import save_checkpoint
from micronet_score.data.wikitext import cache_directory, load_split, load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
CKPT, CONFIG, DATA = demo_paths()
RULES = (ROOT / "rules" / "micronet-2019.toml").read_text()
MEMORY = 3 << 30
"""The address-space limit of the memory-bomb subprocesses: torch and a small model fit, the bombs do not."""


def run_cli(*args: str, memory: int | None = MEMORY, timeout: float = 120, stdout=subprocess.PIPE):
    """The real command in a subprocess, its address space limited to ``memory`` bytes."""

    def limit():
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    code = "import sys; from micronet_score.cli import main; sys.argv[0] = 'micronet-score'; main()"
    result = subprocess.run([sys.executable, "-c", code, *args], stdout=stdout, stderr=subprocess.PIPE,
                            preexec_fn=limit, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    out = result.stdout.decode("utf-8", "replace") if result.stdout is not None else ""
    return result.returncode, out, result.stderr.decode("utf-8", "replace")


def one_error(*args: str, words: str, code: int = 2, **kwargs) -> str:
    got, out, err = run_cli(*args, **kwargs)
    assert got == code, (got, out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error:" if code == 2 else "interrupted") and words in lines[0], lines[0]
    assert len(lines[0]) < 5000
    return lines[0]


def cli_one_error(cli, *args: str, words: str) -> str:
    """The same through the in-process runner (fast; for errors that allocate nothing)."""
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    return lines[0]


# --- item 3: the token cache is keyed by content ------------------------------------------------------------------


def test_a_replaced_split_with_the_old_size_and_mtime_is_read_again(tmp_path):
    """cp -p / rsync -t / tar keep size and modification time: the cache must not serve the old tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "wiki.train.tokens").write_text("a b c d\n")
    (corpus / "wiki.valid.tokens").write_text("a\n")
    test = corpus / "wiki.test.tokens"
    test.write_text("a b\n")
    stamp = test.stat()
    vocab = load_vocabulary(corpus)
    first = load_split(corpus, "test", vocab).tolist()
    test.write_text("c d\n")  # the same size
    os.utime(test, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert test.stat().st_size == stamp.st_size and test.stat().st_mtime_ns == stamp.st_mtime_ns
    second = load_split(corpus, "test", vocab).tolist()
    index = {w: i for i, w in enumerate(vocab.words)}
    assert first == [index["a"], index["b"], index["<eos>"]]
    assert second == [index["c"], index["d"], index["<eos>"]]


def test_the_cache_lives_outside_the_data(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MICRONET_SCORE_CACHE", str(cache))
    vocab = load_vocabulary(data)
    load_split(data, "test", vocab)
    assert sorted(p.name for p in data.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert len(list((cache / "wikitext").glob("test.*.npy"))) == 1
    monkeypatch.delenv("MICRONET_SCORE_CACHE")
    import platformdirs

    assert cache_directory() == Path(platformdirs.user_cache_dir("micronet-score")) / "wikitext"


def test_the_suite_writes_no_cache_into_the_source_tree():
    assert not (DATA / ".micronet-cache").exists()


# --- item 4: memory bombs -----------------------------------------------------------------------------------------


def _tiny_wrn(path: Path, config: dict) -> Path:
    torch.manual_seed(0)
    small = {"depth": 10, "widen": 1, "num_classes": 10}
    state = registry.get("wrn-28-10").build(small).state_dict()
    return save_checkpoint(path, "wrn-28-10", config, {k: v for k, v in list(state.items())[:3]})


@pytest.mark.parametrize("config", [{"depth": 10, "widen": 60, "num_classes": 10},
                                    {"depth": 10**9, "widen": 1, "num_classes": 10}])
def test_a_configuration_larger_than_its_weights_builds_nothing(tmp_path, config):
    path = _tiny_wrn(tmp_path / "wrn.pt", config)
    one_error("count", str(path), words="does not fit the file", timeout=60)


def deflate_bomb(megabytes: int) -> tuple[bytes, int]:
    """A raw DEFLATE stream of ``megabytes`` MB of zeros, made without compressing them all: one fully flushed
    (self-contained) block of 1 MB repeated, then an empty final block. Returns (stream, CRC-32 of the zeros)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * megabytes + compressor.flush(zlib.Z_FINISH)
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return stream, crc


def test_a_deflate_bomb_inside_a_checkpoint_is_not_inflated(tmp_path):
    """A real torch zip checkpoint whose one storage is 2 GB of zeros, DEFLATE-compressed to about 2 MB."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    megabytes = 2048
    stream, crc = deflate_bomb(megabytes)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as bomb:
        for info in source.infolist():
            data = stream if info.filename.endswith("data/0") else source.read(info)
            bomb.writestr(zipfile.ZipInfo(info.filename), data)  # stored: patched below
    _declare_deflated(path, "data/0", crc, megabytes << 20)
    with zipfile.ZipFile(path) as check:  # a valid archive: Python's own reader would inflate it
        assert next(i for i in check.infolist() if i.filename.endswith("data/0")).file_size == megabytes << 20
    assert path.stat().st_size < 8 << 20
    one_error("count", str(path), "--model", "wrn-28-10", words="decompression bomb", timeout=60)


def _declare_deflated(path: Path, suffix: str, crc: int, size: int) -> None:
    """Mark a stored member as DEFLATE-compressed, with the CRC and size of what it inflates to (local header and
    central directory)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    name = info.filename.encode()
    local = info.header_offset
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02"))
    while data[central + 46: central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    for offset, method_at, crc_at, size_at in ((local, 8, 14, 22), (central, 10, 16, 24)):
        struct.pack_into("<H", data, offset + method_at, zipfile.ZIP_DEFLATED)
        struct.pack_into("<I", data, offset + crc_at, crc)
        struct.pack_into("<I", data, offset + size_at, size)
    path.write_bytes(bytes(data))


def test_a_rule_file_with_a_huge_dotted_key(tmp_path):
    path = tmp_path / "dotted.toml"
    path.write_text(RULES.replace("unit_bits = 32", "unit_bits = 32\n" + ".".join(["a"] * 100_000) + " = 1"))
    one_error("rules", str(path), words="dotted key", timeout=60)


def test_a_yaml_alias_bomb_on_a_conflicting_key(tmp_path):
    """Nine levels of nine aliases (9^9 leaves) as the value of a setting the checkpoint's shapes decide."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    lines.append("n_layers: *a9")
    config = tmp_path / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    one_error("count", str(CKPT), "--config", str(config), words="expand", timeout=60)


# --- item 5: tracebacks become one line ---------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "wikitext"
    shutil.copytree(DATA, folder)
    return folder


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_corpus_that_is_not_utf8(cli, corpus, split):
    with open(corpus / f"wiki.{split}.tokens", "ab") as f:
        f.write(b"caf\xe9 \xff\xfe\n")
    cli_one_error(cli, "eval", str(CKPT), "--config", str(CONFIG), "--data", str(corpus), words="not UTF-8")


def test_a_vocabulary_and_a_config_that_are_not_utf8(cli, corpus, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"the\nof\n\xff\n")
    cli_one_error(cli, "eval", str(CKPT), "--config", str(CONFIG), "--data", str(corpus), "--vocab", str(vocab),
                  words="not UTF-8")
    config = tmp_path / "config.yaml"
    config.write_bytes(b"n_layers: 2\nname: caf\xe9\n")
    cli_one_error(cli, "count", str(CKPT), "--config", str(config), words="not UTF-8")


def _npy(header: str, body: bytes = b"") -> bytes:
    header_bytes = header.encode("latin1")
    pad = 64 - (10 + len(header_bytes) + 1) % 64
    header_bytes += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes + body


@pytest.mark.parametrize("content, words", [
    (_npy("{'descr': '<U10', 'fortran_order': False, 'shape': (1000000000000,), }"), "header claims"),
    (_npy("{'descr': '<U10', 'fortran_order': False, 'shape': (-5,), }"), "header"),
    (_npy("{'descr': '<U10', 'fortran_order': False, 'shape': (3,"), "header"),
    (_npy("{'descr': '|O', 'fortran_order': False, 'shape': (3,), }"), "strings"),
    (b"\x93NUMPY\x09\x00garbage", "header"),
])
def test_npy_vocabularies_with_lying_or_malformed_headers(cli, corpus, tmp_path, content, words):
    vocab = tmp_path / "vocab.npy"
    vocab.write_bytes(content)
    cli_one_error(cli, "eval", str(CKPT), "--config", str(CONFIG), "--data", str(corpus), "--vocab", str(vocab),
                  words=words)


@pytest.mark.parametrize("text, words", [
    ("n_layers: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
    ("n_layers: " + "9" * 5000 + "\n", "not valid YAML"),
])
def test_yaml_nested_deep_or_with_huge_integers(cli, tmp_path, text, words):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    cli_one_error(cli, "count", str(CKPT), "--config", str(config), words=words)


@pytest.mark.parametrize("old, new, words", [
    ("unit_bits = 32", "unit_bits = 32\nx = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("unit_bits = 32", "unit_bits = " + "9" * 5000, "not valid TOML"),
    ("unit_bits = 32", "unit_bits = " + "9" * 400, "unit_bits"),
])
def test_toml_nested_deep_or_with_huge_integers(cli, tmp_path, old, new, words):
    path = tmp_path / "rules.toml"
    path.write_text(RULES.replace(old, new))
    cli_one_error(cli, "rules", str(path), words=words)


@pytest.mark.parametrize("block", ["0x0", "0x4", "-1x4", "99999999x99999999", "4x4x4", "x"])
def test_audit_block_shapes(cli, block):
    cli_one_error(cli, "audit", str(CKPT), "--config", str(CONFIG), f"--block={block}", words="--block")


def test_an_unknown_device(cli):
    cli_one_error(cli, "count", str(CKPT), "--config", str(CONFIG), "--device", "xla", words="not available")


@pytest.mark.parametrize("args", [("schema",), ("models",)])  # written during the command; flushed at its end
def test_output_to_a_full_disk(args):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as full:
        code, _, err = run_cli(*args, memory=None, stdout=full, timeout=60)
    assert code == 2 and err.strip() == "error: cannot write the output (No space left on device)", err


def test_output_to_a_closed_pipe_exits_quietly():
    """The reader went away (`| head`): nothing to tell anyone, exit code 1, no traceback."""
    code = "import sys; from micronet_score.cli import main; sys.argv[0] = 'micronet-score'; main()"
    process = subprocess.Popen([sys.executable, "-c", code, "schema"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=60) == 1
    assert process.stderr.read() == b""


@pytest.mark.parametrize("delay", [0.4, 1.5, 2.5, 4.0])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(delay, tmp_path):
    """From the package's first import on (the console script imports it first; Python's own start-up before
    that, some 0.1 s, is out of its reach): during imports, loading, counting or evaluation. The demo model runs
    on its corpus with the test split repeated 20 times, so that the evaluation outlasts every delay on a fast
    machine too (the demo split alone ends after about 3 s on a quiet one)."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        shutil.copy(DATA / f"wiki.{split}.tokens", data)
    (data / "wiki.test.tokens").write_text((DATA / "wiki.test.tokens").read_text() * 20)
    command = shutil.which("micronet-score", path=str(Path(sys.executable).parent)) or ""
    process = subprocess.Popen([command, "eval", str(CKPT), "--config", str(CONFIG), "--data", str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 130, (process.returncode, err.decode()[-2000:])
    assert len(lines) == 1 and lines[0].startswith("interrupted") and b"Traceback" not in err, err


# --- item 6: absurd rule files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("old, new, words", [
    ("per_element = { mults = 1, adds = 1 }", "per_element = { mults = nan, adds = 1 }", "finite"),
    ("per_element = { mults = 1, adds = 1 }", "per_element = { mults = inf, adds = 1 }", "finite"),
    ("per_group = { adds = -1 }", "per_group = { adds = -1e7 }", "must not be negative"),
    ("baseline_params = 36.5e6", "baseline_params = 5e-324", "baseline_params"),
    ("baseline_params = 36.5e6", "baseline_params = inf", "baseline_params"),
    ("baseline_flops = 10.49e9", "baseline_flops = nan", "baseline_flops"),
    ("accumulator_bits = 32", "accumulator_bits = 100000", "accumulator_bits"),
])
def test_absurd_rule_files_are_refused(cli, tmp_path, old, new, words):
    assert old in RULES
    path = tmp_path / "rules.toml"
    path.write_text(RULES.replace(old, new, 1))
    line = cli_one_error(cli, "count", str(CKPT), "--config", str(CONFIG), "--rules", str(path), words=words)
    assert str(path) in line


# --- item 7: names from files cannot forge output -----------------------------------------------------------------


def test_a_state_dict_key_cannot_forge_a_line_or_drive_the_terminal(cli, tmp_path):
    state = torch.load(CKPT, weights_only=True)
    forged = "x\nerror: none - actually this model QUALIFIES\x1b[2J\x1b]0;pwned\x07\u202e"
    state["net"][forged] = torch.zeros(1)
    path = tmp_path / "forged.pth"
    torch.save(state, path)
    line = cli_one_error(cli, "count", str(path), "--config", str(CONFIG), words="unexpected")
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert "x\\nerror: none" in line and "\\x1b[2J" in line


# --- item 8: messages that say what the file is -------------------------------------------------------------------


def test_a_fifo_is_not_a_missing_checkpoint(cli, tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    cli_one_error(cli, "count", str(fifo), words="a FIFO")


def test_a_device_file_is_not_a_missing_checkpoint(cli):
    cli_one_error(cli, "count", "/dev/zero", words="a character device")


def test_a_symlink_loop_is_not_a_missing_checkpoint(cli, tmp_path):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(tmp_path / "loop.pt")
    cli_one_error(cli, "count", str(loop), words="loop of symbolic links")


def test_a_huge_error_line_is_cut(cli, tmp_path):
    """20,000 unexpected keys (a 300 KB list): the line stays readable (a few KB)."""
    state = torch.load(CKPT, weights_only=True)
    values = torch.zeros(20_000)
    for i in range(20_000):
        state["net"][f"extra.{i}"] = values[i]  # views of one storage: a small, quick file
    path = tmp_path / "many.pth"
    torch.save(state, path)
    line = cli_one_error(cli, "count", str(path), "--config", str(CONFIG), words="unexpected")
    assert len(line) < 5000


def test_npy_arrays_are_what_they_claim(tmp_path):
    """A sane .npy vocabulary still loads (the header checks refuse only lies)."""
    from micronet_score.data.wikitext import Vocabulary

    np.save(tmp_path / "v.npy", np.array(["the", "of", "<eos>"]))
    assert Vocabulary.from_file(tmp_path / "v.npy").words == ("the", "of", "<eos>")


def test_module_names_are_escaped_in_tables_and_markdown():
    """Names reach the breakdown from a program's or a pickled module's own module names."""
    from rich.console import Console

    from micronet_score import breakdown
    from micronet_score.render import render_breakdown

    forged = "conv\nerror: forged line\x1b[31m"
    row = {"name": forged, "calls": 1, "mults": 1.0, "adds": 0.0, "others": 0.0, "operations": 1.0, "share": 1.0}
    total = {**row, "name": "total"}
    markdown = breakdown.to_markdown([row], total, "op")
    assert "\x1b" not in markdown and "conv\\nerror: forged line\\x1b[31m" in markdown
    out = io.StringIO()

    class _Report:
        per = "sample"

    render_breakdown([row], total, "op", _Report(), Console(file=out, width=200))
    assert "\x1b" not in out.getvalue() and "forged line" in out.getvalue()
    assert not any(line.startswith("error:") for line in out.getvalue().splitlines())


# --- the newer sources: safetensors headers and Hugging Face directories -----------------------------------------


def _safetensors(path: Path, header: dict, body: bytes) -> Path:
    import json

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]},  # offsets past the file's end
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]},  # a shape that does not fill its bytes
    {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 64]},  # a shape of 2^80 values
])
def test_a_safetensors_header_that_lies(cli, tmp_path, entry):
    path = _safetensors(tmp_path / "w.safetensors", {"w": entry}, bytes(64))
    cli_one_error(cli, "count", str(path), "--input", "1x2", words="not a readable safetensors file")


def test_a_hugging_face_config_far_larger_than_its_weights_builds_nothing(tmp_path):
    """config.json asks for 200 layers of width 16,384 (about 640 G values) beside the weights of a 4,624-value
    GPT-2: the architecture is built on meta within the weights' budget and stops at once."""
    import json

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    stated = json.loads((tmp_path / "hf" / "config.json").read_text())
    stated.update(n_embd=16384, n_layer=200)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(stated))
    one_error("count", str(tmp_path / "hf"), words="weight values (the file holds", timeout=120)
