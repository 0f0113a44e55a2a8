"""Image test sets and top-1 evaluation: generated archives and folders, classifiers with planted answers."""

from __future__ import annotations

import collections
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from micronet_score.data import images as data
from micronet_score.errors import MicronetError
from micronet_score.evaluate_images import count_top1, evaluate_top1


class PixelClassifier(nn.Module):
    """Predicts class round((v - offset) / step) from the first pixel's red value v (0..255), undoing normalisation."""

    def __init__(self, mean, std, classes: int, step: float = 1.0, offset: float = 0.0):
        super().__init__()
        self.mean, self.std, self.classes, self.step, self.offset = mean[0], std[0], classes, step, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x[:, 0, 0, 0] * self.std + self.mean) * 255
        guess = torch.round((value - self.offset) / self.step).long().clamp(0, self.classes - 1)
        return nn.functional.one_hot(guess, self.classes).float()


def cifar_pickle(labels: np.ndarray, right: np.ndarray, protocol: int = 2) -> bytes:
    """A cifar-100-python 'test' pickle whose first pixel is the label where ``right``, label + 1 elsewhere."""
    rng = np.random.default_rng(0)
    pixels = np.tile(rng.integers(0, 256, size=3072, dtype=np.uint8), (len(labels), 1))  # compresses well
    pixels[:, 0] = np.where(right, labels, (labels + 1) % 100)
    batch = {b"batch_label": b"testing batch 1 of 1", b"fine_labels": labels.tolist(),
             b"coarse_labels": (labels // 5).tolist(), b"filenames": [b"x.png"] * len(labels), b"data": pixels}
    return pickle.dumps(batch, protocol=protocol)


def planted(n: int, n_right: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    right = np.zeros(n, dtype=bool)
    right[rng.permutation(n)[:n_right]] = True
    return rng.integers(0, 100, size=n), right


CIFAR_MODEL = PixelClassifier(data.CIFAR100_MEAN, data.CIFAR100_STD, 100)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_archive_evaluates_to_the_planted_accuracy(tmp_path, protocol):
    labels, right = planted(50, 37)
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "test").write_bytes(cifar_pickle(labels, right, protocol))
    images = data.load_cifar100_test(tmp_path / "cifar-100-python")
    assert len(images) == 50 and images.images.dtype == torch.uint8
    result = evaluate_top1(CIFAR_MODEL, images, "CIFAR-100", batch_size=16)
    assert (result.correct, result.total, result.accuracy) == (37, 50, 0.74)
    assert result.track == "cifar100" and not result.qualifies and not result.complete


def test_cifar_tar_archive_and_the_8000_of_10000_threshold(tmp_path):
    labels, right = planted(10_000, 8_000)
    payload = cifar_pickle(labels, right)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/test")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    images = data.load_cifar100_test(archive)
    result = evaluate_top1(CIFAR_MODEL, images, "cifar100", batch_size=1000)
    assert (result.correct, result.qualifies, result.complete, result.threshold) == (8000, True, True, 8000)
    images.labels[right.nonzero()[0][0]] += 1  # one fewer right
    assert not evaluate_top1(CIFAR_MODEL, images, "cifar100", batch_size=1000).qualifies


def test_cifar_unpickler_refuses_other_globals(tmp_path):
    evil = tmp_path / "test"
    evil.write_bytes(pickle.dumps({b"data": collections.OrderedDict(), b"fine_labels": []}))
    with pytest.raises(MicronetError, match="refusing to load collections.OrderedDict"):
        data.load_cifar100_test(evil)
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"fine_labels": [1, 2]}))
    with pytest.raises(MicronetError, match="N x 3072 uint8"):
        data.load_cifar100_test(bad)
    with pytest.raises(MicronetError, match="not found"):
        data.load_cifar100_test(tmp_path / "nowhere")


def write_image(path, red: int, size: tuple[int, int], mode: str = "RGB") -> None:
    colour = red if mode == "L" else (red, 90, 200)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Six solid images of assorted sizes and formats; class c has red value 20c + 10; four are labelled right."""
    folder = tmp_path / "val"
    folder.mkdir()
    specs = [  # (file, class painted, class labelled, size, mode)
        ("a.png", 3, 3, (300, 260), "RGB"), ("b.jpg", 7, 7, (256, 400), "RGB"), ("c.png", 0, 0, (224, 224), "L"),
        ("d.jpeg", 5, 1, (500, 375), "RGB"), ("e.png", 9, 9, (240, 320), "RGB"), ("f.png", 2, 8, (640, 480), "RGB"),
    ]
    for name, painted, _, size, mode in specs:
        write_image(folder / name, 20 * painted + 10, size, mode)
    return folder, [(name, label) for name, _, label, _, _ in specs]


IMAGENET_MODEL = PixelClassifier(data.IMAGENET_MEAN, data.IMAGENET_STD, 10, step=20, offset=10)


def test_image_folder_evaluates_to_the_planted_accuracy(image_folder, tmp_path):
    folder, labels = image_folder
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("".join(f"{name} {label}\n" for name, label in labels))
    images = data.load_image_folder(folder, labels_file)
    batch, _ = next(images.batches(4))
    assert batch.shape == (4, 3, 224, 224)
    assert count_top1(IMAGENET_MODEL, images, batch_size=4) == 4
    result = evaluate_top1(IMAGENET_MODEL, images, "imagenet", batch_size=4)
    assert (result.correct, result.total, result.qualifies, result.threshold) == (4, 6, False, 37500)


def test_image_folder_with_bare_labels_in_sorted_file_order(image_folder, tmp_path):
    folder, labels = image_folder
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("".join(f"{label}\n" for _, label in sorted(labels)))
    assert count_top1(IMAGENET_MODEL, data.load_image_folder(folder, labels_file)) == 4


def test_resize_and_crop_take_the_centre_of_the_shorter_side_at_256():
    image = Image.new("RGB", (512, 300))
    image.paste((255, 0, 0), (0, 0, 256, 300))  # left half red, right half black
    crop = data.resize_and_crop(image)
    assert crop.shape == (3, 224, 224)  # 512x300 -> 437x256 -> centre 224
    assert crop[0, :, :100].min() == 255 and crop[0, :, 124:].max() == 0


def test_bad_labels_files_list_their_problems(image_folder, tmp_path):
    folder, _ = image_folder
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a.png 3\nmissing.png 4\nb.jpg seven\nc.png\n")
    with pytest.raises(MicronetError) as err:
        data.load_image_folder(folder, labels_file)
    message = str(err.value)
    assert "line 2: no image" in message and "line 3: class index 'seven'" in message and "line 4: expected" in message


def test_progress_bar_shows_images_per_second(capsys):
    labels, _ = planted(20, 20)
    images = data.CifarImages(torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.tensor(labels))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 100)).train()
    count_top1(model, images, batch_size=5, progress=True)
    assert model.training  # the training flag is restored
    assert "images/s" in capsys.readouterr().err
