"""Per-tensor statistics of safetensors shards, streamed in bounded chunks: a model larger than memory is measured
from its files, never loaded whole.

Each tensor is read once, in order of its bytes in its shard, a chunk at a time into one of two reused buffers (a
background thread reads the next chunk while this one is counted, and asks the kernel to read the following
``READ_AHEAD_BYTES`` into its page cache meanwhile), and measured by the same functions as a tensor in memory:
nonzeros (``storage.count_nonzero``), block sparsity (``blocks.candidates``, chunks of whole block rows, combined
exactly), and the uniform grid of its values per tensor and per row (``grid.measure`` / ``grid.measure_rows``). A
tensor's values lie on no grid as soon as those of one chunk do, so the grid is followed only while it may exist
(for unstructured weights the first row ends it), and a block shape only while it may still be chosen (with a rule
set, see ``Tilings``: for 50% unstructured sparsity a few hundred rows end every shape); the rest costs one pass
that counts nonzeros.

Peak memory: two chunks plus the temporaries of measuring one (``chunk_bytes`` each, 64 MiB by default).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from micronet_score.counting.blocks import CANDIDATES, Blocks, candidates
from micronet_score.counting.grid import MAX_LEVELS, measure, measure_rows
from micronet_score.counting.representation import Choice, tiling_may_win
from micronet_score.counting.storage import count_nonzero
from micronet_score.errors import MicronetError
from micronet_score.ruleset import MaskPolicy

CHUNK_BYTES = 64 << 20
"""Bytes read and measured at a time."""

PROBE_ROWS = 16
"""Rows of a tensor's first chunk (a multiple of every candidate block height): most questions end there."""

PROBE_ELEMENTS = 1 << 16
"""Elements of the first chunk of a one-dimensional tensor."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype names -> torch dtypes (the format's specification)."""


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file, from its header (nothing read)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """absolute byte offset of its first value in the file"""
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file (8-byte little-endian header length, a JSON header, the data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise MicronetError(f"{path}: not a readable safetensors file ({err})") from None
    base = 8 + length
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MicronetError(f"{path}: malformed safetensors header entry for {name!r}") from None
        dtype = DTYPES.get(kind)
        if dtype is None:
            raise MicronetError(f"{path}: tensor {name!r} has dtype {kind}, which micronet-score cannot measure "
                                f"(known: {', '.join(DTYPES)})")
        tensor = StoredTensor(name, path, dtype, shape, base + int(start), int(end) - int(start))
        if tensor.nbytes != tensor.numel * dtype.itemsize or base + int(end) > size:
            raise MicronetError(f"{path}: tensor {name!r} has {tensor.nbytes} bytes for shape {list(shape)} of {kind}")
        tensors.append(tensor)
    return sorted(tensors, key=lambda t: t.start)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its ``*.safetensors.index.json`` names, else every
    ``*.safetensors`` file in it (empty: a directory with no weights)."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        files: set[str] = set()
        for index in indexes:
            try:
                files.update(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise MicronetError(f"{index}: not a safetensors index ({err})") from None
        missing = sorted(f for f in files if not (directory / f).is_file())
        if missing:
            raise MicronetError(f"{directory}: the index names shard(s) that are not there: {', '.join(missing)}")
        return [directory / f for f in sorted(files)]
    return sorted(directory.glob("*.safetensors"))


@dataclass(slots=True)
class TensorStats:
    """What a tensor's values give the rules: nonzeros, blocks, and the widths of the grids they lie on."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nonzeros: int
    measured_bits: int | None
    """narrowest uniform grid of the whole tensor (None: on no grid)"""
    row_bits: int | None
    """narrowest grid with one scale per row (dim 0; None: on no grid, or a tensor of fewer than 2 dims)"""
    distinct: int
    """distinct values (of the chunks read while a grid could hold them: a lower bound when on no grid)"""
    tilings: list[Blocks]
    """every candidate block tiling (blocks.CANDIDATES order) of a tensor of 2 or more dims with zeros"""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Tilings:
    """Which block tilings to follow: every candidate (None) unless a representation rule says which can win."""

    mask: MaskPolicy
    choice: Choice
    width: Callable[[StoredTensor], int]
    """a width no larger than the one the tensor will be stored at"""

    def follows(self) -> bool:
        return self.mask.block_sparsity and self.choice not in ("dense", "masked")


@dataclass
class _Measuring:
    """One tensor's statistics, accumulated chunk by chunk."""

    tensor: StoredTensor
    tilings: Tilings | None = None
    nonzeros: int = 0
    unique: torch.Tensor | None = None
    on_grid: bool = True
    row_bits: int | None = 0
    blocks: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """candidate shape -> [blocks, kept, kept elements] so far"""
    dense_rows: list[int] = field(default_factory=list)
    """row counts of slices without zeros (their blocks are all kept: tiled only if the tensor has zeros)"""
    _tiled_nonzeros: int = 0
    """nonzeros of the slices tiled so far"""

    def __post_init__(self) -> None:
        if len(self.tensor.shape) < 2:
            self.row_bits = None
        elif self.tilings is None or self.tilings.follows():
            self.blocks = {shape: [0, 0, 0] for shape in CANDIDATES}
        self.width = self.tilings.width(self.tensor) if self.tilings is not None else 0

    def add(self, values: torch.Tensor) -> None:
        """A chunk: whole rows of the tensor viewed as (dim 0, rest), or a flat run of a 1-d tensor."""
        self._falsify(values)
        counted = 0
        for part in _slices(values):  # the measures below make float64 and float copies: a slice at a time
            if not (self.on_grid or self.row_bits is not None or self.blocks):
                break
            nonzeros, _ = count_nonzero(part)
            self.nonzeros += nonzeros
            counted += len(part)
            if self.on_grid:
                self._grid(part)
            if self.row_bits is not None:
                bits, _ = measure_rows(part)
                self.row_bits = None if bits is None else max(self.row_bits, bits)
            if self.blocks and nonzeros == part.numel():
                self.dense_rows.append(len(part))
            elif self.blocks:
                self._tile(part, nonzeros)
        if counted < len(values):  # nothing but nonzeros left to measure: the rest of the chunk in one count
            self.nonzeros += count_nonzero(values[counted:])[0]

    def _falsify(self, values: torch.Tensor) -> None:
        """Answer "no" cheaply where a small part of the chunk does: the first row on no grid (then the tensor, and
        its rows, lie on none)."""
        head = values[:1]
        if self.on_grid:
            self._grid(head)
        if self.row_bits is not None and values.dim() == 2:
            bits, _ = measure_rows(head)
            self.row_bits = None if bits is None else max(self.row_bits, bits)

    def _grid(self, values: torch.Tensor) -> None:
        chunk = torch.unique(values.reshape(-1).to(torch.float64))
        self.unique = chunk if self.unique is None else torch.unique(torch.cat([self.unique, chunk]))
        if self.unique.numel() > MAX_LEVELS or (self.unique.numel() > 1 and measure(self.unique).bits is None):
            self.on_grid = False  # a superset of values on no grid lies on none either

    def _tile(self, values: torch.Tensor, nonzeros: int) -> None:
        self._tiled_nonzeros += nonzeros
        for part in candidates(values):  # whole 16-row block rows: the counts of the chunks add up
            if part.shape in self.blocks:
                _accumulate(self.blocks[part.shape], part)
        if self.tilings is None or self.tilings.choice != "auto":
            return
        rows, numel = self.tensor.shape[0], self.tensor.numel
        cols = numel // rows
        for shape, (_, _, kept_elements) in list(self.blocks.items()):
            total = -(-rows // shape[0]) * -(-cols // shape[1])  # blocks of the whole tensor
            if not tiling_may_win(kept_elements, self._tiled_nonzeros, total, numel, self.width, self.tilings.mask):
                del self.blocks[shape]  # it stores more zeros than a mask costs already: never chosen

    def finish(self) -> TensorStats:
        t = self.tensor
        grid = measure(self.unique) if self.on_grid and self.unique is not None else None
        tilings = []
        if self.blocks and self.nonzeros < t.numel:
            cols = t.numel // t.shape[0] if t.shape[0] else 0
            for rows in self.dense_rows:  # slices without zeros: every block kept
                full, rest = divmod(rows, PROBE_ROWS)
                for height, times in ((PROBE_ROWS, full), (rest, 1)):
                    if height and times:
                        for part in candidates(torch.ones(height, cols)):
                            _accumulate(self.blocks[part.shape], part, times)
            tilings = [
                Blocks(shape, n, kept, elements, elements == self.nonzeros)
                for shape, (n, kept, elements) in self.blocks.items()
            ]
        return TensorStats(
            name=t.name,
            dtype=t.dtype,
            shape=t.shape,
            nonzeros=self.nonzeros,
            measured_bits=grid.bits if grid is not None else None,
            row_bits=self.row_bits if t.numel else None,
            distinct=int(self.unique.numel()) if self.unique is not None else 0,
            tilings=tilings,
        )


MEASURE_ELEMENTS = 1 << 20
"""Elements measured at a time for grids and blocks (their float copies stay a few MiB)."""


def _slices(values: torch.Tensor) -> Iterator[torch.Tensor]:
    """A chunk in slices of at most MEASURE_ELEMENTS (whole rows in multiples of PROBE_ROWS; at least that)."""
    if values.dim() < 2:
        for start in range(0, values.numel(), MEASURE_ELEMENTS):
            yield values[start : start + MEASURE_ELEMENTS]
        return
    cols = values.shape[1]
    step = max(PROBE_ROWS, MEASURE_ELEMENTS // max(1, cols) // PROBE_ROWS * PROBE_ROWS)
    for start in range(0, values.shape[0], step):
        yield values[start : start + step]


def _accumulate(totals: list[int], part: Blocks, times: int = 1) -> None:
    totals[0] += part.blocks * times
    totals[1] += part.kept * times
    totals[2] += part.kept_elements * times


def _chunks(tensor: StoredTensor, chunk_bytes: int) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """(byte offset, bytes, chunk shape) of a tensor's chunks: whole rows in multiples of PROBE_ROWS (the first
    chunk PROBE_ROWS rows), or flat runs for tensors of fewer than 2 dims."""
    item = tensor.dtype.itemsize
    if len(tensor.shape) >= 2 and tensor.shape[0]:
        rows, cols = tensor.shape[0], tensor.numel // tensor.shape[0]
        per = max(PROBE_ROWS, chunk_bytes // max(1, cols * item) // PROBE_ROWS * PROBE_ROWS)
        start, step = 0, PROBE_ROWS
        while start < rows:
            n = min(step, rows - start)
            yield tensor.start + start * cols * item, n * cols * item, (n, cols)
            start, step = start + n, per
        return
    total = tensor.numel
    per = max(1, chunk_bytes // item)
    start, step = 0, min(PROBE_ELEMENTS, per)
    while start < total:
        n = min(step, total - start)
        yield tensor.start + start * item, n * item, (n,)
        start, step = start + n, per


def measure_files(
    files: list[Path],
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
    tilings: Tilings | None = None,
) -> dict[str, TensorStats]:
    """Statistics of every tensor of these safetensors files, read once in bounded chunks (``progress(n)`` is
    called with the bytes of each chunk measured). ``tilings``: follow only the block tilings that its rule
    leaves a chance (default: every candidate, in full)."""
    tensors = [t for path in files for t in read_header(path)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise MicronetError(f"tensor(s) stored in more than one shard: {', '.join(twice[:5])}")
    plan = [(t, *chunk) for t in tensors for chunk in _chunks(t, chunk_bytes)]
    largest = max((nbytes for _, _, nbytes, _ in plan), default=0)
    buffers = [np.empty(largest, dtype=np.uint8) for _ in range(2)]  # not zero-filled: every byte used is read
    stats: dict[str, TensorStats] = {}
    current: _Measuring | None = None
    with (
        _open_files(files) as handles,
        _one_torch_thread(),
        ThreadPoolExecutor(1, thread_name_prefix="micronet-read") as reader,
    ):

        ahead = _ReadAhead(plan, handles)

        def read(i: int):
            tensor, offset, nbytes, _ = plan[i]
            view = memoryview(buffers[i % 2])[:nbytes]
            handle = handles[tensor.file]
            handle.seek(offset)
            if handle.readinto(view) != nbytes:
                raise MicronetError(f"{tensor.file}: ends inside tensor {tensor.name!r} (a truncated file)")
            return view

        pending = reader.submit(read, 0) if plan else None
        for i, (tensor, _, nbytes, shape) in enumerate(plan):
            view = pending.result()
            pending = reader.submit(read, i + 1) if i + 1 < len(plan) else None
            reader.submit(ahead.advise, i + 2)  # after that read: its chunk is returned first
            if current is None or current.tensor is not tensor:
                if current is not None:
                    stats[current.tensor.name] = current.finish()
                current = _Measuring(tensor, tilings)
            if nbytes:
                current.add(torch.frombuffer(view, dtype=tensor.dtype).view(shape))
            if progress is not None:
                progress(nbytes)
        if current is not None:
            stats[current.tensor.name] = current.finish()
    for tensor in tensors:  # tensors without values (a zero in the shape)
        if tensor.name not in stats:
            stats[tensor.name] = _Measuring(tensor, tilings).finish()
    return stats


READ_AHEAD_BYTES = 1 << 30
"""Bytes of the following chunks the kernel is asked to read into its page cache (not this process's memory)."""

ADVISE_BYTES = 2 << 20
"""Bytes announced per call."""


class _ReadAhead:
    """Keeps the disk busy while a chunk waits to be measured (the reader thread reads only one chunk ahead, and
    the measuring can stall, e.g. on the interpreter lock while another thread imports transformers): the next
    READ_AHEAD_BYTES of the plan are announced to the kernel (``posix_fadvise(WILLNEED)``, where it exists)."""

    def __init__(self, plan: list[tuple[StoredTensor, int, int, tuple[int, ...]]], handles: dict) -> None:
        self.plan, self.handles = plan, handles
        self.before = [0]
        """bytes of the plan before each entry"""
        for _, _, nbytes, _ in plan:
            self.before.append(self.before[-1] + nbytes)
        self.next = 0
        """first entry not announced yet"""
        self.enabled = hasattr(os, "posix_fadvise")

    def advise(self, start: int) -> None:
        """Announce the entries from ``start`` on, up to READ_AHEAD_BYTES past it."""
        if start >= len(self.plan):
            return
        self.next = max(self.next, start)
        end = self.before[start] + READ_AHEAD_BYTES
        while self.enabled and self.next < len(self.plan) and self.before[self.next] < end:
            tensor, offset, nbytes, _ = self.plan[self.next]
            self.next += 1
            fd = self.handles[tensor.file].fileno()
            try:  # in pieces: Linux reads at most its read-ahead size (often 128 KiB to 8 MiB) per call
                for start in range(offset, offset + nbytes, ADVISE_BYTES):
                    os.posix_fadvise(fd, start, min(ADVISE_BYTES, offset + nbytes - start), os.POSIX_FADV_WILLNEED)
            except OSError:
                self.enabled = False  # a file system without it: the reads still come, one chunk ahead


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's own threads off while measuring: the chunks' small measures gain nothing from them, and on a
    busy machine their spinning costs up to 10x (the reader thread overlaps the disk instead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _open_files(files: list[Path]) -> Iterator[dict[Path, object]]:
    handles = {}
    try:
        for path in files:
            handles[path] = open(path, "rb", buffering=0)
        yield handles
    finally:
        for handle in handles.values():
            handle.close()


def total_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def memory_budget() -> int:
    """Bytes a model may take in memory before it is streamed instead: half of the memory available now."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


