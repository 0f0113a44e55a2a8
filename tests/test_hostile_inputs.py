"""Damaged inputs end in a clean MicronetError or a correct result: never a traceback, never a hang.

A property-based suite: hypothesis damages real files (checkpoints in micronet-score's and the authors' formats,
rule files, WikiText corpora) in the ways files get damaged (truncation, flipped bytes, spliced garbage, deleted or
retyped lines) and drives them through the same code paths the CLI uses.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micronet_score.checkpoint import load_model, save_checkpoint
from micronet_score.errors import MicronetError
from micronet_score.models import registry
from micronet_score.models.mit_lm import demo_paths
from micronet_score.ruleset import load_rules
from micronet_score.scoring import CountOptions, measure_example, measure_lm

ROOT = Path(__file__).resolve().parents[1]
CKPT, CONFIG, DATA = demo_paths()
RULES_TEXT = (ROOT / "rules" / "micronet-2019.toml").read_text()
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _small_wrn_bytes() -> bytes:
    torch.manual_seed(0)
    config = {"depth": 10, "widen": 1, "num_classes": 10}
    net = registry.get("wrn-28-10").build(config)
    buffer = io.BytesIO()
    torch.save({"format": "micronet-score", "version": 1, "model": "wrn-28-10", "config": config,
                "state_dict": net.state_dict(), "meta": {}}, buffer)
    return buffer.getvalue()


BASES = {"micronet-score": _small_wrn_bytes(), "authors": CKPT.read_bytes()}


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """Truncated, bit-flipped, spliced or replaced bytes of a real file."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "garbage", "empty"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=2048))
    return b""


def _load_and_count(path: Path, config: Path | None) -> None:
    try:
        loaded = load_model(path, config=config)
        report = measure_example(loaded, CountOptions())
    except MicronetError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert report.params >= 0 and report.samples > 0  # a damage that left a loadable file is counted correctly


@SETTINGS
@given(blob=damaged(BASES["micronet-score"]))
def test_damaged_micronet_checkpoints(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    path.write_bytes(blob)
    _load_and_count(path, None)


@SETTINGS
@given(blob=damaged(BASES["authors"]))
def test_damaged_authors_checkpoints(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("ck") / "model-1.pth"
    path.write_bytes(blob)
    _load_and_count(path, CONFIG)


_NUMBER = re.compile(r"(?<=\= )-?[0-9][0-9.e]*")


@st.composite
def damaged_rules(draw) -> str:
    lines = RULES_TEXT.splitlines()
    kind = draw(st.sampled_from(["delete", "retype", "negate", "garbage", "duplicate", "truncate"]))
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "delete":
        del lines[i]
    elif kind == "retype":
        lines[i] = _NUMBER.sub(lambda m: draw(st.sampled_from(['"x"', "true", "[1]", "{}", "nan", "inf"])), lines[i])
    elif kind == "negate":
        lines[i] = _NUMBER.sub(lambda m: "-" + m.group(0).lstrip("-"), lines[i])
    elif kind == "garbage":
        lines.insert(i, draw(st.text(max_size=40)))
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    else:
        lines = lines[:i]
    return "\n".join(lines)


@SETTINGS
@given(text=damaged_rules())
def test_damaged_rule_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("rules") / "rules.toml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        rules = load_rules(path)
    except MicronetError as exc:
        assert str(path) in str(exc)
        return
    assert rules.unit_bits > 0 and all(t.baseline_params > 0 for t in rules.tracks.values())


_WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def corpora(draw) -> dict[str, str | None]:
    """A WikiText-style directory: each split missing, empty, or lines of arbitrary words."""
    out = {}
    for split in ("train", "valid", "test"):
        kind = draw(st.sampled_from(["words", "words", "empty", "missing", "blank"]))
        if kind == "missing":
            out[split] = None
        elif kind == "empty":
            out[split] = ""
        elif kind == "blank":
            out[split] = "\n" * draw(st.integers(1, 5))
        else:
            lines = draw(st.lists(st.lists(_WORDS, max_size=8).map(" ".join), min_size=1, max_size=12))
            out[split] = "\n".join(lines) + "\n"
    return out


@pytest.fixture(scope="module")
def demo_model():
    return load_model(CKPT, config=CONFIG)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=corpora())
def test_damaged_corpora(tmp_path_factory, demo_model, files):
    folder = tmp_path_factory.mktemp("wikitext")
    for split, text in files.items():
        if text is not None:
            (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    try:
        report = measure_lm(demo_model, CountOptions(), folder, "test")
    except MicronetError as exc:
        assert str(exc)
        return
    assert report.quality is not None and report.samples > 0
