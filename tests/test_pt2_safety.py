"""Loading a ``.pt2`` program runs nothing from the file (issue 12, item 1), and ``.pt2`` programs are counted like
the modules they were exported from (issue 13: per-module rows, eval, exported runtime checks free).

Every hostile archive is a real ``torch.export.save`` archive with one member changed the way an attacker would:
a payload that creates a file when unpickled or evaluated. Each must end in exit code 2 with one line saying what
was refused, and the file must not exist afterwards.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import micronet_score as ms
from micronet_score.checkpoint import load_model
from micronet_score.errors import MicronetError
from micronet_score.scoring import CountOptions, measure_example


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return (self.bn(self.conv(x)) + x).relu()


class SmallCNN(nn.Module):
    """A CNN with batch norm after convolutions, a residual add, pooling and a classifier."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = self.block(self.bn(self.stem(x)).relu())
        return self.fc(x.mean((2, 3)))


class Halve(nn.Module):
    """A program with a dynamic batch: its archive holds symbolic-shape expressions and guards."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)[: x.shape[0] // 2]


class Payload:
    """Unpickling it opens (creates) a file: code from the file running."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def cnn_program(cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "cnn.pt2"
    torch.export.save(torch.export.export(cnn, (torch.randn(1, 3, 8, 8),)), path)
    return path


@pytest.fixture(scope="module")
def dynamic_program(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    batch = 2 * torch.export.Dim("half", min=1, max=32)
    program = torch.export.export(Halve().eval(), (torch.randn(8, 4),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "halve.pt2"
    torch.export.save(program, path)
    return path


def members(path: Path) -> tuple[str, dict[str, bytes]]:
    """(root folder, {name inside the root: bytes})."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: archive.read(n) for n in names}


def rewrite(source: Path, target: Path, change) -> Path:
    """A copy of ``source`` with ``change(members)`` applied to its {name: bytes} (stored, as torch writes)."""
    root, content = members(source)
    change(content)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in content.items():
            archive.writestr(f"{root}/{name}", data)
    return target


def weights_config(content: dict[str, bytes]) -> dict:
    return json.loads(content["data/weights/model_weights_config.json"])


def mark_weight_pickled(victim: Path):
    def change(content):
        config = weights_config(content)
        fqn, entry = next(iter(config["config"].items()))
        entry["use_pickle"] = True
        content["data/weights/" + entry["path_name"]] = pickle.dumps(Payload(victim))
        content["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    return change


def add_constant(victim: Path, record: str, use_pickle: bool):
    """A constant record holding a pickle; torch unpickles it when marked use_pickle, and (whatever the flag says)
    when its name starts with opaque_obj_ (pickle.loads) or custom_obj_ (TorchBind's unpickler)."""

    def change(content):
        payload = pickle.dumps(Payload(victim))
        meta = {"dtype": 1, "sizes": [{"as_int": len(payload)}], "strides": [{"as_int": 1}],  # uint8, fits
                "storage_offset": {"as_int": 0}, "requires_grad": False, "device": {"type": "cpu", "index": None},
                "layout": 7}
        config = {"config": {"evil": {"path_name": record, "is_param": False, "use_pickle": use_pickle,
                                      "tensor_meta": None if use_pickle else meta}}}
        content["data/constants/" + record] = payload
        content["data/constants/model_constants_config.json"] = json.dumps(config).encode()

    return change


def replace_example_inputs(blob: bytes):
    def change(content):
        content["data/sample_inputs/model.pt"] = blob

    return change


def edit_program(edit):
    def change(content):
        program = json.loads(content["models/model.json"])
        edit(program)
        content["models/model.json"] = json.dumps(program).encode()

    return change


def _sym_expression(victim: Path):
    def edit(program):
        values = program["graph_module"]["graph"]["sym_int_values"]
        name = next(iter(values))
        values[name]["as_expr"]["expr_str"] = f"__import__('builtins').open({str(victim)!r}, 'w') and Symbol('s1')"

    return edit


def _guard(victim: Path):
    def edit(program):
        program["guards_code"].append(f"open({str(victim)!r}, 'w') is not None")

    return edit


def _node_target(program):
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if "linear" in n["target"])
    node["target"] = "torch.ops.load_library"


ROUTES = {
    "weight marked use_pickle": ("cnn", lambda v: mark_weight_pickled(v), "pickled"),
    "tensor constant marked use_pickle": ("cnn", lambda v: add_constant(v, "tensor_0", True), "pickled"),
    "opaque constant (pickle.loads)": ("cnn", lambda v: add_constant(v, "opaque_obj_0", False), "pickled"),
    "TorchBind constant": ("cnn", lambda v: add_constant(v, "custom_obj_0", True), "pickled"),
    "example inputs that fail the safe load": ("cnn", lambda v: replace_example_inputs(pickle.dumps(Payload(v))),
                                               "pickled"),
    "legacy weights file": ("cnn", lambda v: replace_example_inputs_named("data/weights/model.pt", v), "pickled"),
    "symbolic-shape expression (sympy eval)": ("dynamic", lambda v: edit_program(_sym_expression(v)),
                                               "symbolic-shape expression"),
    "guard code (exec)": ("dynamic", lambda v: edit_program(_guard(v)), "guard"),
    "graph node calling a non-operator": ("cnn", lambda v: edit_program(_node_target), "no tensor operator"),
    "AOTInductor shared library": ("cnn", lambda v: added("data/aotinductor/model/model.so", b"\x7fELF"),
                                   "compiled code"),
}


def replace_example_inputs_named(name: str, victim: Path):
    def change(content):
        content[name] = pickle.dumps(Payload(victim))

    return change


def added(name: str, data: bytes):
    def change(content):
        content[name] = data

    return change


@pytest.mark.parametrize("route", list(ROUTES))
def test_hostile_pt2_runs_nothing(route, cli, cnn_program, dynamic_program, tmp_path):
    base, make, words = ROUTES[route]
    victim = tmp_path / "created-by-the-file"
    path = rewrite(cnn_program if base == "cnn" else dynamic_program, tmp_path / "hostile.pt2", make(victim))
    code, out, err = cli("count", str(path), "--track", "cifar100")
    assert not victim.exists(), f"{route}: the file ran code"
    assert code == 2, (route, code, out, err)
    assert err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err
    if words == "pickled":
        assert "--trust-pickle" in err


def test_unchanged_archive_rewritten_still_loads(cli, cnn_program, tmp_path):
    """The rewriting helper itself keeps a valid archive valid (the hostile tests fail for their payload)."""
    path = rewrite(cnn_program, tmp_path / "same.pt2", lambda content: None)
    code, out, err = cli("count", str(path), "--track", "cifar100", "--json")
    assert code == 0, err
    assert json.loads(out)["flops"] > 0


def test_dynamic_program_with_expressions_and_guards_loads(dynamic_program):
    """A genuine program whose archive holds sympy expressions and guards passes the checks and is counted."""
    report = measure_example(load_model(dynamic_program), CountOptions(track="cifar100"))
    assert report.samples == 8
    assert report.mults == pytest.approx(4 * 2 * 8 / 8)  # 8 rows of a 4->2 linear layer, per sample


def test_trust_pickle_allows_a_pickled_weight(cnn_program, tmp_path):
    """With --trust-pickle the pickled record goes to torch (which runs it): the refusal is what protects."""
    victim = tmp_path / "created"
    path = rewrite(cnn_program, tmp_path / "pickled.pt2", mark_weight_pickled(victim))
    with pytest.raises(MicronetError):
        load_model(path, trust_pickle=True)  # the payload is no tensor, so torch fails after running it
    assert victim.exists()


@pytest.mark.parametrize("blob, words", [
    (lambda: _saved(5), "not (args, kwargs)"),
    (lambda: _saved([torch.zeros(1), torch.zeros(1)]), "not (args, kwargs)"),
    (lambda: _saved(((torch.zeros(1, 3, 8, 8), "text"), {})), "not a tensor"),
    (lambda: _saved(((torch.zeros(1, 3, 8, 8),), {"x": torch.zeros(1)})), "keyword inputs"),
])
def test_malformed_example_inputs_are_one_line(cli, cnn_program, tmp_path, blob, words):
    path = rewrite(cnn_program, tmp_path / "inputs.pt2", replace_example_inputs(blob()))
    code, out, err = cli("count", str(path), "--track", "cifar100")
    assert code == 2 and err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_tensor_metadata_larger_than_its_record_is_refused(cli, cnn_program, tmp_path):
    """An empty record whose metadata asks for 10^12 elements: torch would allocate them (torch.zeros(size))."""

    def change(content):
        config = weights_config(content)
        entry = next(iter(config["config"].values()))
        entry["tensor_meta"]["sizes"] = [{"as_int": 10**6}, {"as_int": 10**6}]
        entry["tensor_meta"]["strides"] = [{"as_int": 10**6}, {"as_int": 1}]
        content["data/weights/" + entry["path_name"]] = b""
        content["data/weights/model_weights_config.json"] = json.dumps(config).encode()

    path = rewrite(cnn_program, tmp_path / "huge.pt2", change)
    code, out, err = cli("count", str(path), "--track", "cifar100")
    assert code == 2 and "asks for 4,000,000,000,000 bytes" in err, err


# --- .pt2 programs counted like their modules (issue 13) ---------------------------------------------------------


def test_pt2_breakdown_rows_equal_the_module(cnn, cnn_program):
    """Per-module rows from the program's module structure: the same names and numbers as counting the module."""
    x = torch.randn(1, 3, 8, 8)
    direct = ms.count(cnn, x, track="cifar100")
    loaded = load_model(cnn_program)
    program = measure_example(loaded, CountOptions(track="cifar100"))
    assert {r.name for r in program.layers} == {r.name for r in direct.layers} >= {"stem", "block.conv", "fc"}
    rows = {r.name: r for r in direct.layers}
    for row in program.layers:
        assert row.type == rows[row.name].type, row.name  # Conv2d, BatchNorm2d, Block... from the program
        assert row.mults == pytest.approx(rows[row.name].mults), row.name
        assert row.adds == pytest.approx(rows[row.name].adds), row.name
        assert row.params == pytest.approx(rows[row.name].params), row.name
    assert program.flops == pytest.approx(direct.flops) and program.params == pytest.approx(direct.params)


def test_pt2_hand_derived_count(cnn_program):
    """One layer by hand: the stem, a 3->4 3x3 convolution (padding 1) on 8x8, is 64 outputs per channel with 27
    mults and 26 adds each, +1 add for the bias; its batch norm folds into one add per output (rules 1.6)."""
    report = measure_example(load_model(cnn_program), CountOptions(track="cifar100"))
    stem = next(r for r in report.layers if r.name == "stem")
    bn = next(r for r in report.layers if r.name == "bn")
    assert stem.mults == 4 * 64 * 27 and stem.adds == 4 * 64 * (26 + 1)
    assert bn.mults == 0 and bn.adds == 4 * 64


def test_exported_runtime_asserts_are_free(tmp_path):
    """A program of a model with tensor checks holds aten._assert_tensor_metadata / _assert_scalar nodes: they are
    data checks, not uncounted work, so --strict passes."""

    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, n):
            k = n.item()
            torch._check(k >= 1)
            torch._check(k <= 4)
            return self.fc(x.to(torch.float32))[:, :k]

    program = torch.export.export(Checked().eval(), (torch.randn(2, 4), torch.tensor(3)))
    path = tmp_path / "checked.pt2"
    torch.export.save(program, path)
    ops = {str(n.target) for n in torch.export.load(path).graph.nodes}
    assert any("assert" in op or "constrain" in op for op in ops), ops
    report = measure_example(load_model(path), CountOptions(track="cifar100", strict=True))
    assert report.uncounted == []


def test_pt2_eval_on_a_cifar_archive_equals_the_model(cli, cnn, tmp_path):
    """`eval` on a .pt2 exported with a fixed batch of 1, over a CIFAR-100-style archive: the same number of
    correct images as running the module itself on the same images."""
    from micronet_score.data.images import load_cifar100_test

    path = tmp_path / "cnn32.pt2"
    torch.export.save(torch.export.export(cnn, (torch.randn(1, 3, 32, 32),)), path)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({b"data": images.reshape(12, -1).numpy(),
                                                b"fine_labels": list(range(12))}))
    batch, _ = next(load_cifar100_test(folder).batches(12))
    with torch.no_grad():
        predicted = cnn(batch).argmax(1).tolist()
    labels = [p if i % 3 else (p + 1) % 5 for i, p in enumerate(predicted)]  # 8 of 12 right, by the module
    (folder / "test").write_bytes(pickle.dumps({b"data": images.reshape(12, -1).numpy(), b"fine_labels": labels}))
    code, out, err = cli("eval", str(path), "--data", str(folder), "--track", "cifar100", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["quality"]["value"] == 8 and report["samples"] == 12
    direct = ms.count(cnn, torch.randn(1, 3, 32, 32), track="cifar100")
    assert report["flops"] == pytest.approx(direct.flops)


# --- property-based: damaged and mutated archives end in one clear error or a correct count --------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                         st.text(max_size=30), st.lists(st.integers(-3, 10**12), max_size=3),
                         st.just({"as_int": 10**15}), st.just([{"as_int": -1}]), st.just({}))


def _leaf_paths(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaf_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaf_paths(item, (*path, i))
    if path:
        yield path


@st.composite
def mutated_archives(draw, base: Path) -> bytes:
    """A real archive with one of: a member's bytes damaged, a JSON member's value replaced or deleted, a member
    removed, or a member added."""
    root, content = members(base)
    names = sorted(content)
    kind = draw(st.sampled_from(["bytes", "json", "json", "remove", "add"]))
    name = draw(st.sampled_from([n for n in names if n.endswith(".json")] if kind == "json" else names))
    if kind == "bytes":
        data = bytearray(content[name])
        how = draw(st.sampled_from(["truncate", "flip", "garbage"]))
        if how == "truncate" or not data:
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        elif how == "flip":
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        else:
            data = bytearray(draw(st.binary(max_size=256)))
        content[name] = bytes(data)
    elif kind == "json":
        document = json.loads(content[name])
        paths = list(_leaf_paths(document))
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_JSON_VALUES)
        content[name] = json.dumps(document).encode()
    elif kind == "remove":
        del content[name]
    else:
        content[draw(st.sampled_from(["data/weights/weight_99", "models/other.json", "extra/x", "junk"]))] = (
            draw(st.binary(max_size=64)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for member, data in content.items():
            archive.writestr(f"{root}/{member}", data)
    return buffer.getvalue()


def _one_clear_error_or_a_count(path: Path) -> None:
    try:
        report = measure_example(load_model(path), CountOptions(track="cifar100"))
    except MicronetError as exc:
        assert str(exc) and "\n" not in str(exc).strip() and len(str(exc)) < 2000
        return
    assert report.params >= 0 and report.flops >= 0 and report.samples > 0


@pytest.fixture(scope="module")
def cnn_archive(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "cnn.pt2"
    torch.export.save(torch.export.export(SmallCNN().eval(), (torch.randn(1, 3, 8, 8),)), path)
    return path


def test_mutated_archives(cnn_archive, dynamic_program, tmp_path_factory):
    @PROPERTY
    @given(st.data())
    def run(data):
        base = data.draw(st.sampled_from([cnn_archive, dynamic_program]))
        blob = data.draw(mutated_archives(base))
        path = tmp_path_factory.mktemp("mutated") / "model.pt2"
        path.write_bytes(blob)
        _one_clear_error_or_a_count(path)

    run()
