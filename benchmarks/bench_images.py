"""Image evaluation against the plain batched forward over the same images (issue 16: at most 1.2x).

    .venv/bin/python benchmarks/bench_images.py [--cifar-images 10000] [--folder-images 1000] [--rounds 2]
                                                [--threads N]

Two generated test sets, written to a temporary directory:

* a CIFAR-size archive: ``cifar-100-python.tar.gz`` holding a ``test`` pickle of 10,000 random 32x32 images,
  evaluated with a WRN-10-2 (CIFAR-100 head) saved as a micronet-score checkpoint;
* an ImageNet-style folder: 1,000 JPEGs of sizes drawn between 160 and 900 pixels a side (smooth colour ramps with
  noise, quality 90) and a labels file, evaluated with MobileNetV2-1.0.

Per round (interleaved, see timing.py), for each set:

* ``plain``: the model over batches of 100 already decoded and normalised in memory (what the issue calls the plain
  batched forward); the images are decoded once before timing, with the same preprocessing;
* ``eval``: ``measure_images`` from the files, as ``micronet-score eval`` runs it: reading the archive or decoding
  the folder, the pipelined evaluation and the operations counted in the same pass;
* ``eval_uncounted``: the same without the Counter (``evaluate_top1`` from the files).

Reported: median seconds of the plain forward, the median ratio of each variant to it, images per second. Writes
benchmarks/results/images.json.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from micronet_score.models import registry
from PIL import Image
from timing import interleaved, save_results, seconds

from micronet_score.checkpoint import load_model, save_checkpoint
from micronet_score.data.images import decode_image, load_cifar100_test, load_image_folder, normalise
from micronet_score.evaluate_images import evaluate_top1
from micronet_score.scoring import CountOptions, measure_images

BATCH = 100


def cifar_archive(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    batch = {b"fine_labels": rng.integers(0, 100, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), np.uint8)}
    payload = pickle.dumps(batch, protocol=2)
    path = root / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/test")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def image_folder(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    folder = root / "val"
    folder.mkdir()
    lines = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(160, 901, 2))
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = ramp + np.linspace(0, 80, h, dtype=np.float32)[:, None, None] + rng.normal(0, 12, (h, w, 3))
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        lines.append(f"{name} {int(rng.integers(0, 1000))}\n")
    labels = root / "labels.txt"
    labels.write_text("".join(lines))
    return folder, labels


def checkpoint(root: Path, name: str, config: dict) -> Path:
    torch.manual_seed(0)
    net = registry.get(name).build(config).eval()
    return save_checkpoint(root / f"{name}.pt", name, config, net.state_dict())


def plain_forward(model: torch.nn.Module, batches: list[torch.Tensor]):
    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch).argmax(-1)

    return run


def measure(label: str, loaded, data: Path, labels: Path | None, track: str, batches, rounds: int) -> dict:
    images = load_image_folder(data, labels) if labels else load_cifar100_test(data)
    options = CountOptions(track=track)
    variants = {
        "eval": lambda: measure_images(loaded, options, data, labels=labels),
        "eval_uncounted": lambda: evaluate_top1(loaded.model, load_image_folder(data, labels) if labels
                                                else load_cifar100_test(data), track),
    }
    forward, ratios, errors = interleaved(plain_forward(loaded.model, batches), variants, rounds)
    n = len(images)
    return {
        "set": label,
        "images": n,
        "plain_forward_seconds": round(forward, 2),
        "plain_images_per_second": round(n / forward, 1),
        "ratio_to_plain": {k: (round(v, 3) if v is not None else None) for k, v in ratios.items()},
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cifar-images", type=int, default=10_000)
    parser.add_argument("--folder-images", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "images.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.cifar_images:
            archive = cifar_archive(root, args.cifar_images)
            loaded = load_model(checkpoint(root, "wrn-28-10", {"depth": 10, "widen": 2, "num_classes": 100}))
            images = load_cifar100_test(archive)
            batches = [b for b, _ in images.batches(BATCH)]
            results.append(measure("CIFAR-size archive, WRN-10-2", loaded, archive, None, "cifar100", batches,
                                   args.rounds))
        if args.folder_images:
            start = time.perf_counter()
            folder, labels = image_folder(root, args.folder_images)
            made = time.perf_counter() - start
            loaded = load_model(checkpoint(root, "mobilenet-v2", {"width": 1.0, "num_classes": 1000}))
            files = load_image_folder(folder, labels).files
            decode = seconds(lambda: [decode_image(f) for f in files[:100]]) / min(100, len(files))
            pixels = torch.stack([decode_image(f) for f in files])
            batches = [normalise(pixels[i : i + BATCH], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
                       for i in range(0, len(pixels), BATCH)]
            entry = measure("ImageNet-style folder, MobileNetV2-1.0", loaded, folder, labels, "imagenet", batches,
                            args.rounds)
            entry["decode_seconds_per_image_one_thread"] = round(decode, 4)
            entry["generation_seconds"] = round(made, 1)
            results.append(entry)
    out = {
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "decode_threads": os.cpu_count(),
        "rounds": args.rounds,
        "results": results,
    }
    save_results(out, args.out)


if __name__ == "__main__":
    main()
