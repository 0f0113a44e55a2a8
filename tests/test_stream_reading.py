"""The streamed reading: every byte after the first two chunks is announced to the kernel once (read-ahead), in
small pieces, a bounded window ahead of the reads; a file system that refuses the advice changes nothing; rows
without zeros between rows with zeros tile as in memory."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("safetensors")

from safetensors.torch import save_file

from micronet_score import streaming
from micronet_score.counting.blocks import candidates
from micronet_score.streaming import measure_files, read_header


def _files(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 40, generator=g)
    weight[torch.rand(96, 40, generator=g) < 0.5] = 0
    save_file({"a": weight, "b": torch.randn(3000, generator=g)}, tmp_path / "a.safetensors")
    save_file({"c": torch.randn(50, 30, generator=g).to(torch.bfloat16)}, tmp_path / "b.safetensors")
    return [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


def _summary(stats):
    return {n: (s.nonzeros, s.measured_bits, s.row_bits, s.distinct, s.tilings) for n, s in stats.items()}


class _Recorded:
    """A file handle that notes where each read ends."""

    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def readinto(self, view):
        n = self.handle.readinto(view)
        self.reads.append((self.handle.name, self.handle.tell()))
        return n


def test_every_byte_after_the_first_chunks_is_announced_once_within_the_window(tmp_path, monkeypatch):
    files = _files(tmp_path)
    reference = _summary(measure_files(files, chunk_bytes=2560))
    reads, calls, names = [], [], {}

    def recording_open(path, *args, **kwargs):
        handle = open(path, *args, **kwargs)
        if kwargs.get("buffering") != 0:
            return handle  # the header's
        names[handle.fileno()] = str(path)
        return _Recorded(handle, reads)

    def advise(fd, offset, n, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append((names[fd], offset, n, reads[-1]))

    monkeypatch.setattr(streaming, "open", recording_open, raising=False)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(streaming, "READ_AHEAD_BYTES", 6000)
    monkeypatch.setattr(streaming, "ADVISE_BYTES", 1000)
    assert _summary(measure_files(files, chunk_bytes=2560)) == reference

    data = {  # every byte of tensor data, by file
        (str(path), byte) for path in files for t in read_header(path) for byte in range(t.start, t.start + t.nbytes)
    }
    announced = [(path, byte) for path, offset, n, _ in calls for byte in range(offset, offset + n)]
    assert len(announced) == len(set(announced))  # once each
    assert set(announced) <= data
    first_two = 16 * 40 * 4 + 2560  # the 16-row probe of "a", then a chunk of whole 16-row blocks
    assert len(announced) == len(data) - first_two
    assert max(n for _, _, n, _ in calls) <= 1000
    for path, offset, n, (read_path, read_end) in calls:  # within the window (plus one chunk) of the last read
        if path == read_path:
            assert read_end <= offset and offset + n <= read_end + 6000 + 2560


def test_a_file_system_without_read_ahead_counts_the_same(tmp_path, monkeypatch):
    files = _files(tmp_path)
    reference = _summary(measure_files(files, chunk_bytes=2560))

    def refuse(*_):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    assert _summary(measure_files(files, chunk_bytes=2560)) == reference


@pytest.mark.parametrize("chunk_bytes", [64 * 20 * 4, 1 << 20])
def test_dense_slices_between_sparse_ones_tile_as_the_whole_tensor(tmp_path, monkeypatch, chunk_bytes):
    """Rows without zeros between rows with zeros (and a short last block row): the streamed tilings, slice by
    slice, equal the candidates of the whole tensor in memory, whether the dense rows fill a chunk or a slice."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(150, 20, generator=g) + 10  # no zeros
    weight[:32][torch.rand(32, 20, generator=g) < 0.3] = 0
    weight[96:][torch.rand(54, 20, generator=g) < 0.3] = 0
    save_file({"w": weight}, tmp_path / "w.safetensors")
    monkeypatch.setattr(streaming, "MEASURE_ELEMENTS", 16 * 20)  # slices of 16 rows
    stats = measure_files([tmp_path / "w.safetensors"], chunk_bytes=chunk_bytes)["w"]
    assert stats.nonzeros == int(torch.count_nonzero(weight))
    assert stats.tilings == candidates(weight)
