"""WikiText-103 (or any corpus in its layout) as token-id streams.

A data directory holds ``wiki.{train,valid,test}.tokens``. Tokenisation is the one the 2019 entrants used: every
line, blank lines included, becomes ``line.split() + ['<eos>']``; no lower-casing, ``<unk>`` is a word.

Vocabularies, by id:

* ``frequency``: descending training-set frequency, ties in order of first appearance. The MIT-HAN-Lab ids came
  from an unstable numpy argsort, so inside ties they differ: for their checkpoints read their ``sorted_vocab.npy``
  with :meth:`Vocabulary.from_file`.
* ``first``: order of first appearance over train, valid, test (PyTorch's word_language_model ``Corpus``; the
  JAIST QRNN entry).
* a file: a numpy array of words (``.npy``, no pickles) or plain text, one word per line.

Tokenised splits are cached on disk (written atomically) so that a second run starts fast.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from micronet_score.checkpoint import write_atomic
from micronet_score.errors import MicronetError

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
CACHE_DIR_NAME = ".micronet-cache"


def split_file(data_dir: str | os.PathLike, split: str) -> Path:
    """``data_dir/wiki.<split>.tokens``, or a clear error."""
    if split not in SPLITS:
        raise MicronetError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise MicronetError(f"{data_dir}: a file; a language model's --data is the directory with wiki.{{train,valid,"
                            "test}.tokens")
    if not data_dir.is_dir():
        raise MicronetError(f"data directory not found: {data_dir}")
    path = data_dir / f"wiki.{split}.tokens"
    if not path.is_file():
        raise MicronetError(f"missing {path.name} in {data_dir} (expected wiki.{{train,valid,test}}.tokens)")
    return path


def words(path: str | os.PathLike) -> Iterator[str]:
    """The tokens of a file: each line's whitespace-separated words, then ``<eos>`` (blank lines too)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield from line.split()
            yield EOS


@dataclass(frozen=True)
class Vocabulary:
    """Words by id."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words):
            dup = next(w for w, n in Counter(self.words).items() if n > 1)
            raise MicronetError(f"vocabulary lists {dup!r} more than once")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        return self._index  # type: ignore[attr-defined]

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]

    @classmethod
    def by_frequency(cls, train_path: str | os.PathLike) -> Vocabulary:
        """Descending training-set frequency; ties keep the order of first appearance."""
        counts = Counter(words(train_path))
        if not counts:
            raise MicronetError(f"empty split: {train_path}")
        return cls(tuple(sorted(counts, key=lambda w: -counts[w])))  # sorted() is stable

    @classmethod
    def by_first_appearance(cls, paths: Iterable[str | os.PathLike]) -> Vocabulary:
        """Order of first appearance over the files in turn (train, valid, test)."""
        seen: dict[str, None] = {}
        for path in paths:
            for w in words(path):
                seen.setdefault(w)
        return cls(tuple(seen))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Vocabulary:
        """A ``.npy`` array of words (such as the authors' ``sorted_vocab.npy``) or a text file, one word a line."""
        path = Path(path)
        if not path.is_file():
            raise MicronetError(f"vocabulary file not found: {path}")
        if path.suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise MicronetError(
                    f"{path}: a vocabulary array must hold strings, not pickled objects ({exc})"
                ) from None
            return cls(tuple(str(w) for w in array.reshape(-1)))
        return cls(tuple(line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), lambda f: f.write(("\n".join(self.words) + "\n").encode("utf-8")))

    def encode(self, tokens: Iterable[str], source: str = "text") -> np.ndarray:
        """Token ids (int32); an error naming the words outside the vocabulary."""
        index = self.index
        ids = []
        missing: Counter[str] = Counter()
        for w in tokens:
            i = index.get(w)
            if i is None:
                missing[w] += 1
            else:
                ids.append(i)
        if missing:
            shown = ", ".join(repr(w) for w, _ in missing.most_common(5))
            raise MicronetError(
                f"{source}: {sum(missing.values())} tokens ({len(missing)} words) are not in the vocabulary "
                f"of {len(self)} words, e.g. {shown}"
            )
        return np.asarray(ids, dtype=np.int32)


def load_vocabulary(
    data_dir: str | os.PathLike,
    order: str = "frequency",
    vocab_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Vocabulary:
    """The vocabulary of a data directory: from ``vocab_file`` if given, else built in ``order``
    (``frequency`` or ``first``) and cached."""
    if vocab_file is not None:
        return Vocabulary.from_file(vocab_file)
    if order not in ("frequency", "first"):
        raise MicronetError(f"unknown vocabulary order {order!r} (frequency, first)")
    paths = [split_file(data_dir, s) for s in (("train",) if order == "frequency" else SPLITS)]
    stamp = _stamp(paths)
    for directory in _cache_dirs(data_dir, cache_dir):
        cached = directory / f"vocab.{order}.{stamp}.txt"
        if cached.is_file():
            return Vocabulary.from_file(cached)
    vocab = Vocabulary.by_frequency(paths[0]) if order == "frequency" else Vocabulary.by_first_appearance(paths)
    _try_cache(data_dir, cache_dir, f"vocab.{order}.{stamp}.txt", vocab.save)
    return vocab


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    vocab: Vocabulary,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The split as one stream of token ids (int64), cached on disk after the first read."""
    path = split_file(data_dir, split)
    name = f"{split}.{vocab.fingerprint()}.{_stamp([path])}.npy"
    for directory in _cache_dirs(data_dir, cache_dir):
        if (directory / name).is_file():
            try:
                return torch.from_numpy(np.load(directory / name, allow_pickle=False).astype(np.int64))
            except (ValueError, OSError):
                pass  # a damaged cache file is rebuilt
    ids = vocab.encode(words(path), source=str(path))
    if ids.size == 0:
        raise MicronetError(f"empty split: {path}")
    _try_cache(data_dir, cache_dir, name, lambda p: write_atomic(p, lambda f: np.save(f, ids)))
    return torch.from_numpy(ids.astype(np.int64))


def _stamp(paths: Sequence[Path]) -> str:
    """Changes when any file changes (size and modification time)."""
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cache_dirs(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None) -> list[Path]:
    if cache_dir is not None:
        return [Path(cache_dir)]
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "micronet-score" / "wikitext"
    return [Path(data_dir) / CACHE_DIR_NAME, user]


def _try_cache(data_dir, cache_dir, name: str, write) -> None:
    """Write into the first writable cache directory; no cache at all is fine."""
    for directory in _cache_dirs(data_dir, cache_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write(directory / name)
            return
        except OSError:
            continue

