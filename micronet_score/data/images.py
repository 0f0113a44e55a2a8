"""The image test sets: CIFAR-100 from its python archive, ImageNet from a folder of validation images.

Both yield batches of normalised float images (N, 3, H, W) with their integer labels.

* CIFAR-100: the ``test`` file of ``cifar-100-python`` (or the folder, or the ``.tar.gz`` holding it): a pickle of
  a dict with ``b'data'`` (10000 x 3072 uint8, channel-major 32x32 images) and ``b'fine_labels'``. It is read
  with an unpickler that rebuilds numpy arrays and builtins only; any other global in the file is refused. An
  archive is read as a stream, and the member's size is checked against ``MAX_CIFAR_BYTES`` before it is read.
  Normalised with the CIFAR-100 training mean and standard deviation.
* ImageNet: a folder of images and a labels file; each line ``<file name> <class index 0..999>``, or only the
  class indices, one per line, for the folder's image files in sorted order. Preprocessed exactly as
  torchvision's ``Resize(256) + CenterCrop(224) + ToTensor() + Normalize(mean, std)`` on the PIL image that its
  ``ImageFolder`` loader gives (``Image.open(f).convert('RGB')``): the shorter side to 256 and the longer one to
  ``int(256 * long / short)`` (truncated), one ``image.resize((w, h), Image.BILINEAR)`` call (Pillow's
  antialiased bilinear filter, no reducing gap), the crop at ``int(round((h - 224) / 2.0))`` from the top and
  the same from the left (zero padding where the image is smaller), then ``x / 255``, ``(x - mean) / std`` in
  float32. Decoding is Pillow's, so the pixels are the reference's bit for bit. Images are decoded by a pool of
  threads (Pillow releases the GIL while decoding and resizing), a few batches ahead of the model.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from micronet_score.errors import MicronetError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm"}
MAX_CIFAR_BYTES = 128 << 20
"""The largest CIFAR test pickle read (the real one is 31 MB); a larger file or archive member is refused unread."""
MAX_IMAGE_PIXELS = 89_478_485
"""The largest image decoded (Pillow's own decompression-bomb limit, 0.25 GB of 24-bit pixels); the size is read
from the file's header before any pixel is decoded."""


class ImageSet(Protocol):
    """A labelled test set that yields normalised batches."""

    name: str

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]: ...


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, 3, H, W) -> float, (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-100


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and builtins; refuses every other global (no code runs from the file)."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocols 0-2
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _cifar_bytes(path: Path) -> bytes:
    if path.is_dir():
        path = path / "test"
    if not path.is_file():
        raise MicronetError(f"CIFAR-100 test file not found: {path} (give the 'test' file of cifar-100-python)")
    if tarfile.is_tarfile(path):
        return _cifar_member(path)
    size = path.stat().st_size
    if size > MAX_CIFAR_BYTES:
        raise MicronetError(f"{path}: {size:,} bytes is not a CIFAR-100 test file (at most {MAX_CIFAR_BYTES:,})")
    return path.read_bytes()


def _cifar_member(path: Path) -> bytes:
    """The ``cifar-100-python/test`` member of a (compressed) tar archive, read as a stream: members are passed
    over without being kept, and the wanted one is read only when its size is plausible."""
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.name.endswith("cifar-100-python/test"):
                    continue
                if not member.isfile():
                    raise MicronetError(f"{path}: {member.name} in the archive is not a regular file")
                if member.size > MAX_CIFAR_BYTES:
                    raise MicronetError(f"{path}: {member.name} in the archive holds {member.size:,} bytes; a "
                                        f"CIFAR-100 test file has about 31 MB (at most {MAX_CIFAR_BYTES:,} read)")
                handle = archive.extractfile(member)
                data = handle.read(MAX_CIFAR_BYTES + 1) if handle is not None else b""
                if len(data) != member.size:
                    raise MicronetError(f"{path}: {member.name} in the archive is truncated")
                return data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MicronetError(f"{path}: cannot read the archive ({exc})") from None
    raise MicronetError(f"{path}: the archive has no cifar-100-python/test")


def _as_text_keys(data: dict) -> dict[str, Any]:
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in data.items()}


@dataclass
class CifarImages:
    """CIFAR images as uint8 (N, 3, 32, 32) with their labels, normalised per batch."""

    images: Tensor
    labels: Tensor
    mean: Sequence[float] = CIFAR100_MEAN
    std: Sequence[float] = CIFAR100_STD
    name: str = "CIFAR-100 test"

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield normalise(self.images[start:stop], self.mean, self.std), self.labels[start:stop]


def load_cifar100_test(path: str | Path) -> CifarImages:
    """The CIFAR-100 test set from the python archive's ``test`` file (or its folder, or the .tar.gz)."""
    path = Path(path)
    try:
        data = _ArrayUnpickler(io.BytesIO(_cifar_bytes(path)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise MicronetError(f"{path}: not a CIFAR-100 python pickle ({exc})") from None
    if not isinstance(data, dict):
        raise MicronetError(f"{path}: not a CIFAR-100 python pickle (a {type(data).__name__}, not a dict)")
    data = _as_text_keys(data)
    missing = [key for key in ("data", "fine_labels") if key not in data]
    if missing:
        raise MicronetError(f"{path}: the CIFAR-100 pickle lacks {', '.join(missing)}")
    pixels = np.asarray(data["data"])
    labels = np.asarray(data["fine_labels"], dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(pixels) != len(labels):
        raise MicronetError(
            f"{path}: expected data as N x 3072 uint8 with N fine labels, got {pixels.dtype} {list(pixels.shape)} "
            f"and {len(labels)} labels"
        )
    images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy())
    return CifarImages(images, torch.from_numpy(labels))


# ----------------------------------------------------------------------------------------------------------------
# ImageNet


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short`` and the longer one ``int(short * long / other)``: the
    arithmetic of torchvision's ``Resize(int)`` (``_compute_resized_output_size``), truncating, not rounding."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def centre_crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop``: ``int(round((size - crop) / 2.0))`` (Python's round, half to
    even) on each axis."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def resize_and_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> Tensor:
    """torchvision's ``Resize(resize)`` then ``CenterCrop(crop)`` of the image converted to RGB, as uint8
    ``(3, crop, crop)`` (``ToTensor`` before its division by 255)."""
    image = image.convert("RGB")
    size = resized_size(*image.size, resize)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    width, height = image.size
    if crop > width or crop > height:  # torchvision pads with zeros, (d // 2, (d + 1) // 2) per axis
        pad_w, pad_h = max(crop - width, 0), max(crop - height, 0)
        padded = Image.new("RGB", (width + pad_w, height + pad_h))
        padded.paste(image, (pad_w // 2, pad_h // 2))
        image, (width, height) = padded, padded.size
    left, top = centre_crop_offsets(width, height, crop)
    if (left, top, width, height) != (0, 0, crop, crop):
        image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def decode_image(file: Path, resize: int = 256, crop: int = 224) -> Tensor:
    """One image file, preprocessed by :func:`resize_and_crop`; a file that is not an image, is damaged, or
    declares more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb) is one clear error naming the file."""
    try:
        with Image.open(file) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MicronetError(f"bad image file {file}: {image.width} x {image.height} pixels is more than "
                                    f"the {MAX_IMAGE_PIXELS:,} decoded (a decompression bomb?)")
            return resize_and_crop(image, resize, crop)
    except Image.DecompressionBombError as exc:
        raise MicronetError(f"bad image file {file}: {exc}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as exc:
        raise MicronetError(f"bad image file {file}: {type(exc).__name__}: {exc}") from None


def default_workers() -> int:
    """Decoding threads: one per CPU the process may use, at least 2 (Pillow decodes outside the GIL)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(2, cpus)


@dataclass
class FolderImages:
    """Image files with labels, decoded by a pool of threads a few batches ahead and normalised per batch."""

    files: list[Path]
    labels: Tensor
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: int = 256
    crop: int = 224
    name: str = "ImageNet validation"
    workers: int | None = None
    """Decoding threads (None: :func:`default_workers`)."""
    ahead: int = 2
    """Batches decoded ahead of the one handed out (bounds the memory: (ahead + 1) batches of images)."""

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        workers = self.workers or default_workers()
        starts = range(0, len(self), batch_size)
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            pending: deque = deque()
            try:
                for start in starts:
                    chunk = self.files[start : start + batch_size]
                    pending.append((start, [pool.submit(decode_image, f, self.resize, self.crop) for f in chunk]))
                    if len(pending) <= self.ahead:
                        continue
                    yield self._batch(*pending.popleft(), batch_size)
                while pending:
                    yield self._batch(*pending.popleft(), batch_size)
            finally:
                for _, futures in pending:  # stopped early (an error, Ctrl-C): decode nothing more
                    for future in futures:
                        future.cancel()

    def _batch(self, start: int, futures: list, batch_size: int) -> tuple[Tensor, Tensor]:
        images = torch.stack([future.result() for future in futures])
        return normalise(images, self.mean, self.std), self.labels[start : start + batch_size]


def _parse_labels(folder: Path, labels_file: Path) -> tuple[list[Path], list[int]]:
    lines = [(n, line.split()) for n, line in enumerate(labels_file.read_text().splitlines(), 1) if line.strip()]
    problems: list[str] = []
    files: list[Path] = []
    labels: list[int] = []
    if lines and all(len(fields) == 1 for _, fields in lines):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) != len(lines):
            problems.append(f"{len(lines)} labels for {len(images)} images in {folder}")
        pairs = [(n, str(image.name), fields[0]) for (n, fields), image in zip(lines, images, strict=False)]
    else:
        pairs = []
        for n, fields in lines:
            if len(fields) != 2:
                problems.append(f"line {n}: expected '<file name> <class index>'")
            else:
                pairs.append((n, fields[0], fields[1]))
    for n, name, label in pairs:
        if not label.isdigit():
            problems.append(f"line {n}: class index {label!r} is not a non-negative integer")
            continue
        file = folder / name
        if not file.is_file():
            problems.append(f"line {n}: no image {file}")
            continue
        files.append(file)
        labels.append(int(label))
    if not pairs and not problems:
        problems.append("no labels")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise MicronetError(f"invalid labels file {labels_file}: {shown}")
    return files, labels


def load_image_folder(folder: str | Path, labels_file: str | Path) -> FolderImages:
    """ImageNet-style validation images in ``folder`` with their classes from ``labels_file``."""
    folder, labels_file = Path(folder), Path(labels_file)
    if not folder.is_dir():
        raise MicronetError(f"image folder not found: {folder}")
    if not labels_file.is_file():
        raise MicronetError(f"labels file not found: {labels_file}")
    files, labels = _parse_labels(folder, labels_file)
    return FolderImages(files, torch.tensor(labels, dtype=torch.long))
