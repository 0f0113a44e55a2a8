"""Counting a model larger than memory from its files (``count DIR --stream``), against reading the files once.

1. A Llama-architecture model (Llama-2-7B's configuration by default, 6.7B parameters) in bf16 with 50% unstructured
   sparsity in every matrix, written as sharded safetensors by this script into a temporary directory (deleted
   afterwards): time and peak RSS of ``micronet-score count DIR --stream --json`` against ``cat shards >
   /dev/null``. Each is run twice, cold (this script's own shards evicted from the page cache with
   posix_fadvise(DONTNEED) first: the disk's limit) and warm (the shards just read).
   The streaming phase alone (``measure_files``, warm, in a process whose imports are done) is timed too.
2. (b) Loading with transformers and counting in memory: not for the 7B model on a machine shared by several jobs
   (its 13.5 GB of bf16 values would have to be in memory at once), so on a 1.1B model (TinyLlama's configuration,
   same sparsity): ``from_pretrained`` + ``count(shape_only=True)``, time and peak RSS, with the totals checked
   equal to the streamed count's.
3. ``--shape-only`` on a directory holding only Llama-3-70B's config.json: the whole CLI run (time, peak RSS), and
   in-process the count (build on meta + counted forward of 128 tokens) against torch's FlopCounterMode on the
   same meta model (build + forward), median (and fastest) of 7 interleaved rounds; and the time of the CLI's
   imports alone (torch, transformers and the Llama modeling code), which any run pays first.

The values are a pool of random chunks written in rotation (every tensor 50% zeros at random positions; writing
14 GB of fresh random numbers would take minutes and measure nothing more). Usage::

    .venv/bin/python benchmarks/bench_stream.py [--model 7b|1b|tiny] [--dir /tmp] [--skip-big] [--skip-memory]
    .venv/bin/python benchmarks/bench_stream.py --measure-proxy   # seconds: one 4096x11008 weight's measurement
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = [sys.executable, "-m", "micronet_score"]

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "torch_dtype": "bfloat16", "tie_word_embeddings": False}
CONFIGS = {
    "7b": dict(LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "1b": dict(LLAMA, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(LLAMA, vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "70b": dict(LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0),
}
SHARD_BYTES = 2 << 30
POOL_ELEMENTS = 1 << 24


def meta_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the checkpoint of this configuration (transformers' state dict, built on meta)."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _pool(sparse: bool, seed: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for _ in range(4):
        values = (torch.randn(POOL_ELEMENTS, generator=g) * 0.02).to(torch.bfloat16)
        values[values == 0] = 1e-3  # exactly the chosen positions are zero
        if sparse:
            values[torch.rand(POOL_ELEMENTS, generator=g) < 0.5] = 0
        chunks.append(values.view(torch.int16).numpy().tobytes())
    return chunks


def write_model(directory: Path, config: dict) -> int:
    """Sharded bf16 safetensors (own writer: header, then values chunk by chunk) with an index; returns bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = meta_tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    pools = {True: _pool(True, 1), False: _pool(False, 2)}
    weight_map, total, turn = {}, 0, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(directory / file, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape in shard:
                pool = pools[len(shape) >= 2]
                left = int(np.prod(shape)) * 2
                while left:
                    chunk = pool[turn % len(pool)]
                    turn += 1
                    n = min(left, len(chunk))
                    f.write(chunk[:n])
                    left -= n
        total += 8 + len(text) + offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def evict(directory: Path) -> None:
    """This script's own files out of the page cache (the next read comes from the disk)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Like :func:`run`, with the child's own peak RSS (GNU time's %M, kB)."""
    timed = ["/usr/bin/time", "-f", "%e %M", *command]
    start = time.perf_counter()
    done = subprocess.run(timed, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{command[:5]} failed: {done.stderr.decode()[-2000:]}")
    _, peak_kb = done.stderr.decode().strip().splitlines()[-1].split()
    return seconds, int(peak_kb) / 1e6, done.stdout.decode()


def cat(directory: Path) -> float:
    files = sorted(str(p) for p in directory.glob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run(f"cat {' '.join(files)} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def bench_big(name: str, base: Path) -> dict:
    directory = Path(tempfile.mkdtemp(prefix=f"micronet-stream-{name}-", dir=base))
    try:
        start = time.perf_counter()
        size = write_model(directory, CONFIGS[name])
        written = time.perf_counter() - start
        result = {"model": name, "bytes": size, "write_s": written}
        stream = [*CLI, "count", str(directory), "--stream", "--json"]
        for state in ("cold", "warm"):
            evict(directory) if state == "cold" else cat(directory)
            result[f"cat_{state}_s"] = cat(directory)
            evict(directory) if state == "cold" else None
            seconds, peak, out = run_measured(stream)
            report = json.loads(out)
            result[f"stream_{state}_s"], result[f"stream_{state}_peak_gb"] = seconds, peak
            result["params"], result["flops"] = report["params"], report["flops"]
            layers = report["layers"]
            result["density"] = sum(r["nonzeros"] for r in layers) / sum(r["params"] for r in layers)
        # the streaming phase alone (warm): measure_files in a process whose imports are done
        code = ("import json, time; from pathlib import Path; from micronet_score.streaming import measure_files, "
                "weight_files; from micronet_score.streamed_count import _tilings; "
                f"d = Path({str(directory)!r}); files = weight_files(d); "
                "rule = _tilings(json.loads((d / 'config.json').read_text()), {}); t = time.perf_counter(); "
                "measure_files(files, tilings=rule); print(time.perf_counter() - t)")
        cat(directory)
        _, result["measure_files_warm_peak_gb"], out = run_measured([sys.executable, "-c", code])
        result["measure_files_warm_s"] = float(out)
        return result
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_memory(name: str, base: Path) -> dict:
    """(b): transformers from_pretrained + count(shape_only) against the streamed count, in child processes."""
    directory = Path(tempfile.mkdtemp(prefix=f"micronet-memory-{name}-", dir=base))
    try:
        size = write_model(directory, CONFIGS[name])
        code = (
            "import json, sys, torch, transformers, micronet_score as ms\n"
            f"m = transformers.LlamaForCausalLM.from_pretrained({str(directory)!r}, dtype=torch.bfloat16).eval()\n"
            "r = ms.count(m, torch.zeros((1, 128), dtype=torch.long), shape_only=True)\n"
            "print(json.dumps({'params': r.params, 'flops': r.flops}))\n"
        )
        cat(directory)
        loaded_s, loaded_peak, out = run_measured([sys.executable, "-c", code])
        loaded = json.loads(out)
        stream_s, stream_peak, out = run_measured([*CLI, "count", str(directory), "--stream", "--json"])
        streamed = json.loads(out)
        return {"model": name, "bytes": size, "in_memory_s": loaded_s, "in_memory_peak_gb": loaded_peak,
                "stream_s": stream_s, "stream_peak_gb": stream_peak,
                "same_totals": loaded["params"] == streamed["params"] and loaded["flops"] == streamed["flops"]}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_shape_only(base: Path, rounds: int = 7) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="micronet-70b-config-", dir=base))
    try:
        (directory / "config.json").write_text(json.dumps(CONFIGS["70b"]))
        cli_s, cli_peak, out = run_measured([*CLI, "count", str(directory), "--shape-only", "--json"])
        report = json.loads(out)
        imports = ("import micronet_score.cli, micronet_score.streamed_count, transformers; "
                   "transformers.LlamaForCausalLM")
        imports_s, _, _ = run_measured([sys.executable, "-c", imports])  # what any run of the CLI pays first
        code = f"""
import json, statistics, time, torch, transformers
from pathlib import Path
from torch.utils.flop_counter import FlopCounterMode
from micronet_score.scoring import CountOptions, measure_directory
config = transformers.LlamaConfig(**json.loads(Path({str(directory / "config.json")!r}).read_text()))
ids = torch.zeros((1, 128), dtype=torch.long, device="meta")
def ours():
    measure_directory(Path({str(directory)!r}), CountOptions(), progress=False)
def flop_counter():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    with FlopCounterMode(display=False), torch.no_grad():
        model(ids)
times = {{"ours": [], "flop_counter": []}}
ours(); flop_counter()
for r in range({rounds}):
    for key, fn in (("ours", ours), ("flop_counter", flop_counter))[:: 1 if r % 2 == 0 else -1]:
        start = time.perf_counter(); fn(); times[key].append(time.perf_counter() - start)
fastest = {{k + "_min": min(v) for k, v in times.items()}}
print(json.dumps({{**{{k: statistics.median(v) for k, v in times.items()}}, **fastest}}))
"""
        _, inproc_peak, out = run_measured([sys.executable, "-c", code])
        inproc = json.loads(out)
        return {"cli_s": cli_s, "cli_peak_gb": cli_peak, "imports_s": imports_s, "params": report["params"],
                "flops": report["flops"], "ours_s": inproc["ours"], "flop_counter_s": inproc["flop_counter"],
                "ours_min_s": inproc["ours_min"], "flop_counter_min_s": inproc["flop_counter_min"], "rounds": rounds,
                "in_process_peak_gb": inproc_peak}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_measure_proxy(base: Path, rounds: int = 5) -> dict:
    """The storage measurement of one Llama-2-7B MLP weight (4096 x 11008, bf16, 50% unstructured zeros), warm, in
    this process: every candidate block tiling of the whole tensor (``blocks.candidates``, as the in-memory count
    and audit take it), and ``measure_files`` of a file holding only it, with the streamed count's tiling rule
    (best of ``rounds``, MB/s of bf16 values)."""
    from safetensors.torch import save_file

    from micronet_score.counting.blocks import candidates
    from micronet_score.streamed_count import _tilings
    from micronet_score.streaming import measure_files

    g = torch.Generator().manual_seed(0)
    values = (torch.randn(4096, 11008, generator=g) * 0.02).to(torch.bfloat16)
    values[values == 0] = 1e-3
    values[torch.rand(4096, 11008, generator=g) < 0.5] = 0
    mb = values.numel() * values.element_size() / 1e6
    directory = Path(tempfile.mkdtemp(prefix="micronet-measure-", dir=base))
    try:
        save_file({"model.layers.0.mlp.down_proj.weight": values}, directory / "model.safetensors")
        rule = _tilings(CONFIGS["7b"], {})
        files = [directory / "model.safetensors"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as measure_files runs
        times: dict[str, list[float]] = {"candidates": [], "measure_files": []}
        for _ in range(rounds):
            for key, fn in (("candidates", lambda: candidates(values)),
                            ("measure_files", lambda: measure_files(files, tilings=rule))):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        return {"tensor_mb": mb, **{f"{k}_mb_s": mb / min(v) for k, v in times.items()}}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["7b", "1b", "tiny"], default="7b")
    parser.add_argument("--memory-model", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--measure-proxy", action="store_true",
                        help="only the storage measurement of one 4096x11008 weight (seconds, no big files)")
    args = parser.parse_args()
    out = HERE / "results" / "stream.json"
    results: dict = json.loads(out.read_text()) if out.is_file() else {}  # sections skipped now keep their last run
    sections = {"shape_only_70b": lambda: bench_shape_only(args.dir)}
    if args.measure_proxy:
        sections = {"measure_proxy": lambda: bench_measure_proxy(args.dir)}
    elif not args.skip_memory:
        sections["in_memory"] = lambda: bench_memory(args.memory_model, args.dir)
    if not (args.skip_big or args.measure_proxy):
        sections["streamed"] = lambda: bench_big(args.model, args.dir)
    for key, section in sections.items():
        load = os.getloadavg()[0]
        results[key] = section() | {"load_before": load, "load_after": os.getloadavg()[0], "cpus": os.cpu_count()}
        print(json.dumps(results[key], indent=1), flush=True)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
