"""``.safetensors`` weights, single or sharded (``*.safetensors.index.json``), opened lazily.

A :class:`SafetensorsWeights` is a read-only mapping of tensor names to tensors. Opening it reads only the headers:
names, shapes and dtypes (:meth:`~SafetensorsWeights.entries`) are known without loading a value; a tensor is read
from its memory-mapped file when it is looked up, one at a time, so a model's weights are never copied into memory
all at once before they are needed. Nothing in a safetensors file is code: loading one is always safe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from micronet_score.errors import MicronetError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """What a header says of one tensor: its shape, dtype and the file holding it."""

    shape: tuple[int, ...]
    dtype: str
    file: Path


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file is a safetensors file (by its header: a little-endian length, then a JSON object)."""
    path = Path(path)
    if path.name.endswith(".safetensors.index.json"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 1 < size <= path.stat().st_size - 8 and head[8:9] == b"{"


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise MicronetError(f"{file}: not a readable safetensors file ({str(exc).strip().splitlines()[0]})") from None


class SafetensorsWeights(Mapping):
    """The tensors of one safetensors file, of the shards an index names, or of a directory holding either."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, TensorEntry] = {}
        self._handles: dict[Path, object] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            handle = self._open(file)
            self.metadata.update(handle.metadata() or {})
            for name in handle.keys():
                view = handle.get_slice(name)
                self._entries[name] = TensorEntry(tuple(int(d) for d in view.get_shape()), view.get_dtype(), file)

    def _files(self) -> list[Path]:
        path = self.path
        if path.is_dir():
            for name in (INDEX, SINGLE):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise MicronetError(f"{path}: no {SINGLE} or {INDEX} in this directory")
        if not path.is_file():
            raise MicronetError(f"checkpoint not found: {path}")
        self.path = path
        if not path.name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise MicronetError(f"{path}: not a safetensors index (no weight_map)") from None
        files = sorted({path.parent / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MicronetError(f"{path}: shard(s) not found beside the index: {', '.join(missing[:5])}")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor's shape, dtype and file, read from the headers only (no value is loaded)."""
        return dict(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self._entries.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return self._open(entry.file).get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now (for loaders that need the whole state dict)."""
        return {name: self[name] for name in self._entries}
