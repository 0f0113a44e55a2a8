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
from micronet_score.models import registry
from micronet_score.models.mit_lm import demo_paths

from micronet_score.checkpoint import load_model, save_checkpoint
from micronet_score.errors import MicronetError
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
    # A damage that left a loadable file is counted within what its tensors can hold, by torch's own count of
    # them: every stored value at most once (tied tensors once), at most 32 bits and a 1-bit mask each.
    tensors = {t.untyped_storage()._cdata: t for t in [*loaded.model.parameters(), *loaded.model.buffers()]}
    values = sum(t.numel() for t in tensors.values())
    assert 0 < report.params <= values * (1 + 1 / 32) and report.samples > 0
    assert report.mults > 0 and report.flops > 0


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


_WRN_STATE = torch.load(io.BytesIO(BASES["micronet-score"]), weights_only=True)["state_dict"]
_FLOAT_KEYS = sorted(k for k, v in _WRN_STATE.items() if v.is_floating_point())


@st.composite
def damaged_state_dicts(draw) -> tuple[dict, str, str]:
    """A loadable file whose state dict is wrong: a key deleted, added or reshaped (same size or not), a tensor
    retyped, or values made NaN/Inf. Returns (state dict, kind, key)."""
    state = dict(_WRN_STATE)
    kind = draw(st.sampled_from(["delete", "add", "reshape", "resize", "retype", "nonfinite"]))
    key = draw(st.sampled_from(sorted(state) if kind != "nonfinite" else _FLOAT_KEYS))
    value = state[key]
    if kind == "delete":
        del state[key]
    elif kind == "add":
        key = key + draw(st.sampled_from([".extra", "_copy", "0"]))
        state[key] = torch.zeros(draw(st.integers(0, 3)))
    elif kind == "reshape":  # the same number of values, another shape
        state[key] = value.reshape(-1) if value.dim() != 1 else value.reshape(1, -1)
    elif kind == "resize":
        state[key] = torch.zeros(value.numel() + draw(st.integers(1, 5)))
    elif kind == "retype":
        state[key] = value.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int64, torch.bool])))
    else:
        value = value.clone()
        flat = value.view(-1)
        bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        flat[draw(st.integers(0, flat.numel() - 1))] = bad
        state[key] = value
    return state, kind, key


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=damaged_state_dicts())
def test_damaged_state_dicts(tmp_path_factory, case):
    """Keys that do not fit are named in one line; values that fit (retyped, non-finite) are counted, and NaN or
    Inf values are named in the report's warnings."""
    state, kind, key = case
    path = save_checkpoint(tmp_path_factory.mktemp("sd") / "model.pt", "wrn-28-10",
                           {"depth": 10, "widen": 1, "num_classes": 10}, state)
    try:
        report = measure_example(load_model(path), CountOptions())
    except MicronetError as exc:
        message = str(exc)
        assert kind in ("delete", "add", "reshape", "resize") and key in message and "\n" not in message
        return
    assert kind in ("retype", "nonfinite", "reshape")  # a [1] tensor fits a 0-d one
    assert report.params > 0 and report.samples == 1
    nonfinite = [w for w in report.warnings if "NaN or Inf" in w]
    assert (kind == "nonfinite") == bool(nonfinite) and (not nonfinite or key in nonfinite[0])
