"""The image test sets: CIFAR-100 from its python archive, ImageNet from a folder of validation images.

Both yield batches of normalised float images (N, 3, H, W) with their integer labels.

* CIFAR-100: the ``test`` file of ``cifar-100-python`` (or the folder, or the ``.tar.gz`` holding it): a pickle of
  a dict with ``b'data'`` (10000 x 3072 uint8, channel-major 32x32 images) and ``b'fine_labels'``. It is read
  with an unpickler that rebuilds numpy arrays and builtins only; any other global in the file is refused.
  Normalised with the CIFAR-100 training mean and standard deviation.
* ImageNet: a folder of images and a labels file; each line ``<file name> <class index 0..999>``, or only the
  class indices, one per line, for the folder's image files in sorted order. Decoded with Pillow as RGB, the
  shorter side resized to 256 (bilinear), the centre 224x224 cropped, normalised with the ImageNet mean and
  standard deviation.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Iterator, Sequence
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
        with tarfile.open(path) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("cifar-100-python/test")), None)
            if member is None or (handle := archive.extractfile(member)) is None:
                raise MicronetError(f"{path}: the archive has no cifar-100-python/test")
            return handle.read()
    return path.read_bytes()


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


def resize_and_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> Tensor:
    """RGB, shorter side to ``resize`` (bilinear), centre ``crop`` x ``crop``; uint8 (3, crop, crop)."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class FolderImages:
    """Image files with labels, decoded and preprocessed per batch."""

    files: list[Path]
    labels: Tensor
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: int = 256
    crop: int = 224
    name: str = "ImageNet validation"

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, file: Path) -> Tensor:
        try:
            with Image.open(file) as image:
                return resize_and_crop(image, self.resize, self.crop)
        except (OSError, UnidentifiedImageError) as exc:
            raise MicronetError(f"cannot decode image {file}: {exc}") from None

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            chunk = self.files[start : start + batch_size]
            images = torch.stack([self._decode(file) for file in chunk])
            yield normalise(images, self.mean, self.std), self.labels[start : start + batch_size]


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
