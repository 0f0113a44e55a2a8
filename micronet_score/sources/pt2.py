"""``torch.export`` programs (``.pt2``), loaded without running code from the file.

``torch.export.load`` trusts its archive. It unpickles weights and constants marked ``use_pickle``, opaque and
TorchBind constants, and example inputs that do not load with ``weights_only=True``; it evaluates the program's
symbolic-shape strings with sympy (a Python ``eval``), compiles the program's guards into Python code, lets graph
nodes call any ``torch.*`` attribute, and loads AOTInductor members as shared libraries. So the archive is read
once into memory and every member is checked before torch sees those same bytes:

- members: only the exported program's (no compiled AOTInductor, ExecuTorch or MTIA code);
- torch-serialised members (example inputs, legacy weight files) must load with ``weights_only=True``;
- weight and constant records: none pickled (``use_pickle``, opaque or TorchBind objects); each tensor's shape,
  strides and offset must fit the bytes of its record (an empty record may not ask for a huge tensor);
- the program: every graph node calls an aten or higher-order operator, a symbolic-shape helper or a plain
  ``operator``/``math`` function; symbolic-shape expressions and guards are arithmetic and comparisons over
  symbols, sizes and small integer literals (no attributes but a tensor's ``size()``/``stride()``, no powers).

With ``trust_pickle`` the pickled and code-bearing parts are allowed (the user trusts the file); the size checks
stay. The program is run as ``torch.export.unflatten`` rebuilds it: one submodule per original module, so that
operations are charged to the module that ran them, as for the model itself.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import operator
import re
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor, nn

from micronet_score.errors import MicronetError
from micronet_score.sources.files import check_zip_sizes, regular_file

NAME = "torch.export"
TRUST_HINT = "if you trust the file, pass --trust-pickle (trust_pickle=True)"

_METADATA = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
             ".data/serialization_id", "constants", "serialized_exported_program.json"}
_ALLOWED_DIRS = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/", "extra_files/",
                 ".data/")
_COMPILED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")

_SYMPY_NAMES = frozenset(
    "Symbol Integer Float Rational Mul Add Max Min Mod Eq Ne Lt Le Gt Ge StrictLessThan StrictGreaterThan "
    "LessThan GreaterThan Equality Unequality And Or Not true false True False oo zoo nan Infinity "
    "NegativeInfinity IntInfinity NegativeIntInfinity Abs floor ceiling Piecewise ExprCondPair Half One Zero "
    "NegativeOne FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift "
    "FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal "
    "ToFloat Identity".split()
)
"""What a program's symbolic-shape expressions (sympy ``srepr`` strings) may name: sympy's numbers, arithmetic,
comparisons and logic, and torch's integer shape functions. Not ``Pow``/``PowByNatural``/``FloatPow``: a power of
literals is an unbounded computation at load time."""
_SYMPY_KEYWORDS = frozenset(
    "positive integer real nonnegative negative nonpositive finite infinite zero nonzero even odd extended_real "
    "commutative precision".split()
)
_GUARD_NAMES = frozenset("L math max min abs int float round bool len inf IsNonOverlappingAndDenseIndicator "
                         "cast_symbool_to_symint_guardless".split())
_GUARD_ATTRIBUTES = frozenset("size stride storage_offset dim numel floor ceil trunc sqrt isnan isinf".split())
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_NUMBER_TEXT = re.compile(r"-?[0-9][0-9.e+-]{0,40}")
_MAX_LITERAL = 1 << 63
_MAX_EXPRESSION = 20_000
_EXPRESSION_NODES = (ast.Expression, ast.Call, ast.Name, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
                     ast.Compare, ast.BoolOp, ast.Load, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod,
                     ast.USub, ast.UAdd, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And,
                     ast.Or, ast.Subscript, ast.Attribute, ast.Tuple)

_OPERATOR_FUNCTIONS = frozenset(
    "getitem add sub mul floordiv truediv mod neg pos eq ne lt le gt ge and_ or_ xor not_ invert abs index "
    "truth".split()
)
_MATH_FUNCTIONS = frozenset(
    "floor ceil trunc sqrt exp log log2 log10 sin cos tan tanh isnan isinf isfinite fabs copysign fmod".split()
)
_SYMBOLIC_FUNCTIONS = frozenset(
    "sym_int sym_float sym_max sym_min sym_not sym_ite sym_sum sym_sqrt _sym_sqrt sym_float sym_fresh_size".split()
)


def load_program(path: str | Path, device: str | torch.device = "cpu", trust_pickle: bool = False):
    """A ``.pt2`` program as a :class:`~micronet_score.checkpoint.LoadedModel`: its module (one submodule per
    original module, in evaluation mode as exported) and the example inputs it was exported with."""
    from micronet_score.checkpoint import LoadedModel

    path = regular_file(path)
    data = path.read_bytes()
    source = str(path)
    if not data:
        raise MicronetError(f"{source}: empty file (0 bytes), not a torch.export program")
    check_zip_sizes(io.BytesIO(data), len(data), source)
    args = check_archive(data, source, trust_pickle)
    program = _torch_load(data, source)
    if args is None:
        args = _example_args(program.example_inputs, source)
    module = _runnable(program)
    module.to(device)
    inputs = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args) if args is not None else None
    meta: dict[str, Any] = {"source": source}
    batch = _static_batch(program)
    if batch is not None:
        meta["batch_size"] = batch
    return LoadedModel(NAME, module, {}, meta, inputs)


def check_archive(data: bytes, source: str, trust_pickle: bool = False) -> tuple | None:
    """Check every member of a ``.pt2`` archive (see the module's docstring); one clear error for the first
    member that would run code or blow up memory. Returns the example inputs' positional arguments, read
    safely (None when the archive has none)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        strip = _root_folder(archive.namelist())
        members = {info.filename[strip:]: info for info in archive.infolist()}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise MicronetError(f"{source}: not a torch.export program, or damaged ({exc})") from None
    if "models/model.json" not in members and "serialized_exported_program.json" not in members:
        raise MicronetError(f"{source}: not a torch.export program (no models/model.json in the archive)")

    def read(name: str) -> bytes:
        try:
            return archive.read(members[name])
        except Exception as exc:  # CRC errors, truncation, unsupported compression
            raise MicronetError(f"{source}: damaged member {_shown(name)} ({exc})") from None

    example_args = None
    for name in members:
        if name.endswith("/"):
            continue
        if any(name.startswith(d) for d in _COMPILED_DIRS):
            raise MicronetError(f"{source}: holds compiled code ({_shown(name)}), which loading would run; "
                                "micronet-score reads exported programs only")
        if name not in _METADATA and not name.startswith(_ALLOWED_DIRS) and not name.startswith("serialized_"):
            raise MicronetError(f"{source}: unexpected member {_shown(name)} (not part of a torch.export program)")
        if name.startswith(("models/",)) and name.endswith(".json") or name == "serialized_exported_program.json":
            if not trust_pickle:
                _check_program(_json(read(name), source, name), source, name)
        elif name.endswith("_config.json") and name.startswith(("data/weights/", "data/constants/")):
            _check_payloads(_json(read(name), source, name), name, members, source, trust_pickle)
        elif name.endswith(".pt") or (name.startswith("serialized_") and name.endswith(".json")):
            value = _safe_torch_load(read(name), source, name, trust_pickle)
            if name == "data/sample_inputs/model.pt" or name == "serialized_example_inputs.pt":
                example_args = _example_args(value, source)
    return example_args


def _root_folder(names: list[str]) -> int:
    """The length of the archive's one root folder ("name/"; torch's writer puts every record under one), or 0."""
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) == 1 and all("/" in n for n in names):
        return len(roots.pop()) + 1
    return 0


def _shown(text: str, limit: int = 80) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text)


def _json(raw: bytes, source: str, name: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise MicronetError(f"{source}: damaged member {_shown(name)} (not JSON: {problem})") from None


def _safe_torch_load(raw: bytes, source: str, name: str, trust_pickle: bool) -> Any:
    """A torch-serialised member, loaded with ``weights_only=True`` (what torch tries first, before falling back
    to a full unpickle that this check rules out)."""
    check_zip_sizes(io.BytesIO(raw), len(raw), f"{source}: member {_shown(name)}")
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        if trust_pickle:
            return None
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
            raise MicronetError(f"{source}: member {_shown(name)} holds pickled Python objects, which loading would "
                                f"run; {TRUST_HINT}") from None
        raise MicronetError(f"{source}: damaged member {_shown(name)} ({text.strip().splitlines()[0][:200]})"
                            if text.strip() else f"{source}: damaged member {_shown(name)}") from None


def _check_payloads(config: Any, name: str, members: dict, source: str, trust_pickle: bool) -> None:
    """A weights or constants config: no pickled entry, and every tensor inside the bytes of its record."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise MicronetError(f"{source}: damaged member {_shown(name)} (no 'config' mapping)")
    folder = name.rsplit("/", 1)[0] + "/"
    constants = folder == "data/constants/"
    for fqn, meta in entries.items():
        where = f"{source}: {'constant' if constants else 'weight'} {_shown(str(fqn))}"
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise MicronetError(f"{where}: damaged entry in {_shown(name)}")
        record = meta["path_name"]
        pickled = bool(meta.get("use_pickle")) or (constants and not record.startswith("tensor_"))
        if pickled:
            if trust_pickle:
                continue
            raise MicronetError(f"{where} is stored as a pickled Python object, which loading would run; "
                                f"{TRUST_HINT}")
        info = members.get(folder + record)
        if "/" in record or info is None:
            raise MicronetError(f"{where}: its record {_shown(record)} is missing from the archive")
        _check_tensor_fits(meta.get("tensor_meta"), info.file_size, where)


def _ints(values: Any) -> list[int] | None:
    if not isinstance(values, list):
        return None
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if type(n) is not int or n < 0:
            return None
        out.append(n)
    return out


def _check_tensor_fits(meta: Any, record_bytes: int, where: str) -> None:
    """The bytes a strided tensor reads (its last element's offset + 1, times the element size) must lie in its
    record; torch would otherwise allocate what the metadata asks for."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    if not isinstance(meta, dict):
        raise MicronetError(f"{where}: no tensor metadata")
    sizes, strides = _ints(meta.get("sizes")), _ints(meta.get("strides"))
    offset = _ints([meta.get("storage_offset")])
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype")) if isinstance(meta.get("dtype"), int) else None
    if sizes is None or strides is None or offset is None or len(sizes) != len(strides) or dtype is None:
        raise MicronetError(f"{where}: damaged tensor metadata (sizes, strides, offset or dtype)")
    if 0 in sizes:
        return
    last = offset[0] + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True))
    needed = (last + 1) * torch.empty((), dtype=dtype).element_size()
    if needed > record_bytes:
        raise MicronetError(f"{where}: its metadata asks for {needed:,} bytes (shape {sizes}) but its record holds "
                            f"{record_bytes:,}")


def _walk(value: Any) -> Iterator[dict]:
    """Every mapping inside a JSON value (iteratively: no recursion limit to hit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_program(program: Any, source: str, name: str) -> None:
    """Graph-node targets, symbolic-shape expressions and guards of a serialised program (see the docstring)."""
    for item in _walk(program):
        target = item.get("target")
        if isinstance(target, str) and "inputs" in item and "outputs" in item:
            if not _allowed_target(target):
                raise MicronetError(f"{source}: the program calls {_shown(target)}, which is no tensor operator; "
                                    f"loading it could run anything; {TRUST_HINT}")
        expr = item.get("expr_str")
        if isinstance(expr, str):
            problem = _expression_problem(expr, sympy=True)
            if problem:
                raise MicronetError(f"{source}: a symbolic-shape expression of the program is not plain arithmetic "
                                    f"({problem}): {_shown(expr)}; loading would evaluate it as Python; {TRUST_HINT}")
        guards = item.get("guards_code")
        if guards is not None:
            if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
                raise MicronetError(f"{source}: damaged member {_shown(name)} (guards_code is not a list of strings)")
            for guard in guards:
                problem = _expression_problem(guard, sympy=False)
                if problem:
                    raise MicronetError(f"{source}: a guard of the program is not a check of input sizes "
                                        f"({problem}): {_shown(guard)}; loading would run it as Python code; "
                                        f"{TRUST_HINT}")


def _allowed_target(target: str) -> bool:
    """An aten/higher-order operator (resolved by name only, nothing called), a symbolic-shape helper, or a pure
    ``operator``/``math`` function: what an exported graph calls. ``#`` extension operators are refused."""
    head, _, rest = target.partition(".")
    if head == "_operator":
        return rest in _OPERATOR_FUNCTIONS and hasattr(operator, rest)
    if head == "math":
        return rest in _MATH_FUNCTIONS
    if head != "torch":
        return False
    if rest in _SYMBOLIC_FUNCTIONS:
        return hasattr(torch, rest)
    parts = rest.split(".")
    if parts[0] != "ops" or not 3 <= len(parts) <= 4 or not all(p.isidentifier() and "__" not in p for p in parts):
        return False
    obj: Any = torch.ops
    try:
        for part in parts[1:]:
            obj = getattr(obj, part)
    except Exception:
        return False
    return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))


def _expression_problem(text: str, sympy: bool) -> str | None:
    """Why ``text`` is not a plain shape expression (None when it is). ``sympy``: a sympy ``srepr`` string (named
    functions and symbols, keyword assumptions); else a guard over ``L['x'].size()[i]``."""
    if len(text) > _MAX_EXPRESSION:
        return f"{len(text):,} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"
    try:
        nodes = list(ast.walk(tree))
    except RecursionError:
        return "nested too deeply"
    for node in nodes:
        if not isinstance(node, _EXPRESSION_NODES):
            return f"{type(node).__name__} is not allowed"
        if isinstance(node, ast.Name):
            allowed = node.id in _SYMPY_NAMES or _SYMBOL.fullmatch(node.id) if sympy else node.id in _GUARD_NAMES
            if not allowed:
                return f"unknown name {node.id!r}"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or value is None or isinstance(value, float):
                continue
            if isinstance(value, int):
                if abs(value) >= _MAX_LITERAL:
                    return "an integer literal of more than 63 bits"
            elif isinstance(value, str):
                if not (_SYMBOL.fullmatch(value) or _NUMBER_TEXT.fullmatch(value)) and sympy:
                    return f"string {value[:40]!r}"
                if not sympy and not value.isidentifier():
                    return f"string {value[:40]!r}"
            else:
                return f"constant of type {type(value).__name__}"
        elif isinstance(node, ast.Attribute):
            if sympy or node.attr not in _GUARD_ATTRIBUTES:
                return f"attribute {node.attr!r}"
        elif isinstance(node, ast.keyword):
            if not sympy or node.arg not in _SYMPY_KEYWORDS:
                return f"keyword {node.arg!r}"
        elif isinstance(node, ast.Subscript) and sympy:
            return "subscript"
        elif isinstance(node, ast.Call) and not isinstance(node.func, (ast.Name, ast.Attribute)):
            return "a call of a computed function"
    return None


def _example_args(value: Any, source: str) -> tuple | None:
    """The positional example inputs from ``(args, kwargs)``: tensors or plain numbers, no keyword inputs."""
    if value is None or value == {}:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], dict)):
        raise MicronetError(f"{source}: its example inputs are not (args, kwargs) but {type(value).__name__}; "
                            "export the program again with torch.export.export(model, args)")
    args, kwargs = value
    if kwargs:
        shown = ", ".join(_shown(str(k), 40) for k in list(kwargs)[:5])
        raise MicronetError(f"{source}: exported with keyword inputs ({shown}); export with positional ones")
    for arg in args:
        if not isinstance(arg, (Tensor, int, float, bool)):
            raise MicronetError(f"{source}: an example input is {type(arg).__name__}, not a tensor or a number")
    return tuple(args)


def _torch_load(data: bytes, source: str):
    logger = logging.getLogger("torch.export")  # it logs a traceback on stderr for a file that is no program
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise MicronetError(f"{source}: not a torch.export program, or damaged ({first})") from None
    finally:
        logger.setLevel(level)


def _runnable(program) -> nn.Module:
    """The program as a module tree like the exported model's (``torch.export.unflatten``), else its flat graph
    module; either way ``train()``/``eval()`` keep the mode fixed at export instead of raising."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own deprecation notices about its pytree internals
            module = torch.export.unflatten(program)
    except Exception:
        module = program.module()
    if not _mode_switch_works(module):
        module.train = types.MethodType(_fixed_mode, module)
        module.eval = types.MethodType(_fixed_mode, module)
    _name_module_types(module, program)
    return module


def _name_module_types(module: nn.Module, program) -> None:
    """Give each rebuilt submodule the class name of the module it was exported from (from the program's
    ``nn_module_stack`` metadata), so that breakdown rows say ``Conv2d``, not ``InterpreterModule``: the instance's
    class becomes a subclass of its own class named after the original (behaviour unchanged)."""
    names: dict[str, str] = {}
    for node in program.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            text = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1]
            if text.isidentifier():
                names.setdefault(path, text)
    classes: dict[tuple[type, str], type] = {}
    for path, submodule in module.named_modules():
        name = names.get(path)
        if name and type(submodule).__name__ != name:
            key = (type(submodule), name)
            if key not in classes:
                classes[key] = type(name, (type(submodule),), {"__module__": type(submodule).__module__})
            submodule.__class__ = classes[key]


def _mode_switch_works(module: nn.Module) -> bool:
    try:
        module.train(module.training)
    except NotImplementedError:
        return False
    return True


def _fixed_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


def _static_batch(program) -> int | None:
    """The first dimension of the first input when the program was exported with it fixed (it runs only on
    batches of that size), else None."""
    try:
        first = next(n for n in program.graph.nodes if n.op == "placeholder"
                     and n.name in program.graph_signature.user_inputs)
        shape = first.meta["val"].shape
    except (StopIteration, KeyError, AttributeError):
        return None
    if len(shape) == 0 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


def is_program(path: str | Path) -> bool:
    """A ``.pt2`` file name (torch.export's own convention)."""
    return PurePosixPath(str(path)).suffix == ".pt2"
