"""ImageNet preprocessing as torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize computes it, the
pipelined evaluation against the model run directly, and hostile image inputs (decompression bombs, archive
members that lie about their size).

The reference values are derived here from torchvision's arithmetic (transforms/functional.py: the long side
``int(256 * long / short)``, the crop at ``int(round((size - 224) / 2.0))``; _functional_pil.py:
``img.resize((w, h), Image.BILINEAR)``; ToTensor ``div(255)``, Normalize ``sub_(mean).div_(std)``) and applied
with direct Pillow calls; torchvision itself cannot be installed beside the CPU build of torch here.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from micronet_score.data import images as data
from micronet_score.errors import MicronetError
from micronet_score.evaluate_images import count_top1, prefetched

MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)

# (file, size, mode, resized (w, h) by torchvision's arithmetic, crop box (left, top) by int(round(d / 2.0)))
CASES = [
    ("wide.jpg", (640, 427), "RGB", (383, 256), (80, 16)),  # 383.7 truncated; (383-224)/2 = 79.5 -> 80 (even)
    ("tall.png", (427, 640), "RGB", (256, 383), (16, 80)),
    ("no_resize.png", (381, 256), "RGB", None, (78, 16)),  # short side already 256; 78.5 -> 78 (half to even)
    ("odd.png", (1001, 257), "L", (997, 256), (386, 16)),  # 997.0 from 256 * 1001 / 257 = 997.07
    ("square.bmp", (300, 300), "RGB", (256, 256), (16, 16)),
    ("palette.png", (255, 333), "P", (256, 334), (16, 55)),  # upscaled; 334.3 truncated; (334-224)/2 = 55
    ("alpha.png", (512, 259), "RGBA", (506, 256), (141, 16)),  # 506.07; (506-224)/2 = 141
]


def noise_image(size, mode, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(64)
    return image.convert(mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    for seed, (name, size, mode, _, _) in enumerate(CASES):
        noise_image(size, mode, seed).save(root / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    return root


def reference_crop(path, resized, box) -> np.ndarray:
    """Direct Pillow calls with the sizes and offsets derived above: ImageFolder's loader, Resize, CenterCrop."""
    with open(path, "rb") as f:
        image = Image.open(f).convert("RGB")
    if resized is not None:
        image = image.resize(resized, Image.BILINEAR)
    left, top = box
    return np.asarray(image.crop((left, top, left + 224, top + 224)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_preprocessing_matches_torchvision_arithmetic_bit_for_bit(folder, case):
    name, size, _, resized, box = case
    expected = reference_crop(folder / name, resized, box)
    got = data.decode_image(folder / name)
    assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_size_arithmetic_truncates_and_rounds_half_to_even():
    assert data.resized_size(640, 427, 256) == (383, 256)  # the hand-written rounding gave 384
    assert data.resized_size(427, 640, 256) == (256, 383)
    assert data.resized_size(500, 500, 256) == (256, 256)
    assert data.centre_crop_offsets(383, 256, 224) == (80, 16)
    assert data.centre_crop_offsets(381, 256, 224) == (78, 16)  # round(78.5) = 78, not 79


def test_smaller_than_the_crop_is_zero_padded_as_torchvision():
    image = noise_image((50, 30), "RGB", 9)
    got = data.resize_and_crop(image, resize=30, crop=40)  # resized to 50x30; pad (0, 5) top and (5) bottom
    arr = got.permute(1, 2, 0).numpy()
    # width 50 -> crop left int(round(10 / 2.0)) = 5; height 30 padded to 40 (5 above, 5 below)
    assert arr[:5].max() == 0 and arr[35:].max() == 0
    assert np.array_equal(arr[5:35], np.asarray(image)[:, 5:45])


def test_batches_are_normalised_as_to_tensor_then_normalize(folder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name} {i}\n" for i, (name, *_) in enumerate(CASES)))
    images = data.load_image_folder(folder, labels)
    images.workers, images.ahead = 3, 1
    batches = list(images.batches(3))
    assert [len(b) for b, _ in batches] == [3, 3, 1]
    got = torch.cat([b for b, _ in batches])
    for i, (name, _, _, resized, box) in enumerate(CASES):
        x = torch.from_numpy(reference_crop(folder / name, resized, box).copy()).permute(2, 0, 1)
        expected = x.to(torch.float32).div(255).sub_(MEAN).div_(STD)
        assert torch.equal(got[i], expected), name
    assert torch.equal(torch.cat([lab for _, lab in batches]), torch.arange(len(CASES)))


def test_pipelined_evaluation_equals_the_model_on_the_same_batches(folder, tmp_path):
    """Labels planted from the model's own predictions on the reference-preprocessed images (right for even
    files, wrong for odd ones): the pipelined count, at any batch size, is the number of even files."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4)).eval()
    with torch.no_grad():
        crops = [reference_crop(folder / name, resized, box) for name, _, _, resized, box in CASES]
        reference = torch.stack([torch.from_numpy(c.copy()).permute(2, 0, 1).to(torch.float32).div(255)
                                 .sub_(MEAN).div_(STD) for c in crops])
        predicted = model(reference).argmax(-1).tolist()
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name} {p if i % 2 == 0 else (p + 1) % 4}\n"
                              for i, ((name, *_), p) in enumerate(zip(CASES, predicted, strict=True))))
    images = data.load_image_folder(folder, labels)
    images.workers, images.ahead = 2, 1
    for batch_size in (1, 2, 7):
        assert count_top1(model, images, batch_size=batch_size) == (len(CASES) + 1) // 2


def test_prefetched_keeps_order_raises_where_the_producer_failed_and_stops_early():
    def numbers(fail_at=None):
        for i in range(10):
            if i == fail_at:
                raise MicronetError(f"bad item {i}")
            yield i

    assert list(prefetched(numbers(), ahead=3)) == list(range(10))
    seen = []
    with pytest.raises(MicronetError, match="bad item 4"):
        for item in prefetched(numbers(fail_at=4)):
            seen.append(item)
    assert seen == [0, 1, 2, 3]
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    for item in prefetched(endless(), ahead=2):
        if item == 5:
            break
    assert closed == [True]  # the producer's generator was closed, not left running


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds one tiny IDAT: what a decompression bomb's header
    looks like to a decoder."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 9_000)], ids=["over 2x Pillow's limit", "just over"])
def test_decompression_bomb_is_a_bad_image_file(tmp_path, size):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(*size))
    with pytest.warns() if size[0] * size[1] < 2 * data.MAX_IMAGE_PIXELS else _nothing():
        with pytest.raises(MicronetError, match=r"bad image file .*bomb\.png"):
            data.decode_image(bomb)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_broken_image_in_a_folder_stops_the_evaluation_with_its_name(folder, tmp_path):
    broken = tmp_path / "val"
    broken.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (broken / name).write_bytes((folder / "square.bmp").read_bytes() if name != "b.png" else b"\x89PNG\r\n\x1a\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("a.png 0\nb.png 1\nc.png 2\n")
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(MicronetError, match=r"bad image file .*b\.png"):
        count_top1(model, data.load_image_folder(broken, labels), batch_size=1)


def test_eval_of_a_decompression_bomb_is_one_error_line(cli, tmp_path):
    from micronet_score.models import registry

    from micronet_score.checkpoint import save_checkpoint

    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (tmp_path / "labels.txt").write_text("bomb.png 1\n")
    config = {"depth": 10, "widen": 1, "num_classes": 10}
    net = registry.get("wrn-28-10").build(config).eval()
    path = save_checkpoint(tmp_path / "wrn.pt", "wrn-28-10", config, net.state_dict())
    code, out, err = cli("eval", str(path), "--data", str(folder), "--labels", str(tmp_path / "labels.txt"),
                         "--track", "imagenet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "bad image file" in err and "forward failed" not in err


def tar_member(name: str, declared: int, payload: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = declared
    return info.tobuf(format=tarfile.GNU_FORMAT) + payload


def test_cifar_archive_member_larger_than_a_cifar_file_is_refused_unread(tmp_path):
    """A member whose header declares 3.4 GB (what a 14 MB gzip bomb expands to) is refused from its header,
    before a byte of it is read; the archive is read as a stream."""
    archive = tmp_path / "cifar-100-python.tar.gz"
    import gzip

    archive.write_bytes(gzip.compress(tar_member("cifar-100-python/test", 3_400_000_000, b"\0" * 4096)))
    with pytest.raises(MicronetError, match=r"3,400,000,000 bytes"):
        data.load_cifar100_test(archive)
    sparse = tmp_path / "test"
    with open(sparse, "wb") as f:  # a sparse file: large, but only its first byte (a pickle's) written
        f.write(b"\x80")
        f.truncate(data.MAX_CIFAR_BYTES + 1)
    with pytest.raises(MicronetError, match="is not a CIFAR-100 test file"):
        data.load_cifar100_test(sparse)


def test_cifar_archive_with_the_member_after_others_is_read_as_a_stream(tmp_path):
    from test_images import cifar_pickle, planted

    labels, right = planted(30, 12)
    payload = cifar_pickle(labels, right)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in (("cifar-100-python/meta", b"x" * 1000), ("cifar-100-python/test", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    images = data.load_cifar100_test(archive)
    assert len(images) == 30 and torch.equal(images.labels, torch.from_numpy(labels))
