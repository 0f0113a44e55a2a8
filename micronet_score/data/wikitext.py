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

Tokenised splits and built vocabularies are cached (written atomically) so that a second run starts fast. The
cache is keyed by the files' contents (a BLAKE2 hash of every byte), never by their names, sizes or modification
times, and it lives in the user's cache directory (``platformdirs.user_cache_dir("micronet-score")``, or the
directory named by the ``MICRONET_SCORE_CACHE`` environment variable), never beside the data.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from micronet_score.checkpoint import write_atomic
from micronet_score.errors import MicronetError
from micronet_score.sources.files import regular_file

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
CACHE_ENV = "MICRONET_SCORE_CACHE"
"""An environment variable naming the cache directory (tests point it at a temporary one)."""


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
        try:
            for line in f:
                yield from line.split()
                yield EOS
        except UnicodeDecodeError as exc:
            raise MicronetError(f"{path}: not UTF-8 text ({_decode_problem(exc)})") from None


def _decode_problem(exc: UnicodeDecodeError) -> str:
    return f"byte 0x{exc.object[exc.start]:02x} is not valid UTF-8"


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
        path = regular_file(path, "vocabulary")
        if path.suffix == ".npy":
            return cls(tuple(str(w) for w in _word_array(path).reshape(-1)))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise MicronetError(f"{path}: not UTF-8 text ({_decode_problem(exc)})") from None
        return cls(tuple(line.rstrip("\n") for line in text.splitlines() if line.strip()))

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


def _word_array(path: Path) -> np.ndarray:
    """A ``.npy`` array of strings, its header checked before anything is allocated: a string dtype, and a shape
    whose bytes the file holds (a header may claim any shape)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f, max_header_size=10_000)
    except Exception as exc:  # numpy raises ValueError, SyntaxError, TypeError... for a damaged header
        raise MicronetError(f"{path}: not a numpy .npy file, or its header is damaged ({_first(exc)})") from None
    if dtype.kind not in "US":
        raise MicronetError(f"{path}: a vocabulary array must hold strings, not {dtype} values (no pickled objects)")
    if any(d < 0 for d in shape):
        raise MicronetError(f"{path}: its header claims an impossible shape {shape}")
    needed = math.prod(shape) * dtype.itemsize
    if needed > size:
        raise MicronetError(f"{path}: its header claims shape {shape} of {dtype} ({needed:,} bytes) but the file "
                            f"holds {size:,} bytes")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MicronetError(f"{path}: damaged .npy file ({_first(exc)})") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_vocabulary(
    data_dir: str | os.PathLike,
    order: str = "frequency",
    vocab_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Vocabulary:
    """The vocabulary of a data directory: from ``vocab_file`` if given, else built in ``order``
    (``frequency`` or ``first``) and cached under the files' content hash."""
    if vocab_file is not None:
        return Vocabulary.from_file(vocab_file)
    if order not in ("frequency", "first"):
        raise MicronetError(f"unknown vocabulary order {order!r} (frequency, first)")
    paths = [split_file(data_dir, s) for s in (("train",) if order == "frequency" else SPLITS)]
    cached = cache_directory(cache_dir) / f"vocab.{order}.{content_hash(paths)}.txt"
    if cached.is_file():
        try:
            return Vocabulary.from_file(cached)
        except MicronetError:
            pass  # a damaged cache file is rebuilt
    vocab = Vocabulary.by_frequency(paths[0]) if order == "frequency" else Vocabulary.by_first_appearance(paths)
    _try_cache(cached, vocab.save)
    return vocab


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    vocab: Vocabulary,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The split as one stream of token ids (int64), cached under its content hash after the first read."""
    path = split_file(data_dir, split)
    cached = cache_directory(cache_dir) / f"{split}.{vocab.fingerprint()}.{content_hash([path])}.npy"
    if cached.is_file():
        try:
            return torch.from_numpy(np.load(cached, allow_pickle=False).astype(np.int64))
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt
    ids = vocab.encode(words(path), source=str(path))
    if ids.size == 0:
        raise MicronetError(f"empty split: {path}")
    _try_cache(cached, lambda p: write_atomic(p, lambda f: np.save(f, ids)))
    return torch.from_numpy(ids.astype(np.int64))


def content_hash(paths: Sequence[Path]) -> str:
    """A BLAKE2 hash of the files' bytes (and their order): two files with the same bytes share their cache,
    a file whose bytes change gets a new one, whatever its name, size or modification time."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digest.update(b"\0end of file\0")
    return digest.hexdigest()


def cache_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MICRONET_SCORE_CACHE``, else the user's cache directory; ``wikitext`` inside."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get(CACHE_ENV)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("micronet-score")
    return Path(root) / "wikitext"


def _try_cache(path: Path, write) -> None:
    """Write a cache file; a cache that cannot be written is no error (the next run rebuilds it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError:
        pass
