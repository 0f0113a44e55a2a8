"""Peak memory of loading a sharded safetensors checkpoint through micronet-score, against reading it whole.

A model of 8 linear layers 2048x2048 (32M parameters, 128 MiB in fp32) is saved as two shards with an index.
Each case runs in a fresh process and reports its peak resident memory above the process's baseline (after
importing torch and micronet-score):

- ``headers``: ``SafetensorsWeights(index).entries()``, names, shapes and dtypes only;
- ``load_model``: ``load_model(index, model="bench_net:Net")``, the model built and filled tensor by tensor;
- ``whole``: ``safetensors.torch.load_file`` of every shard, then ``load_state_dict`` (everything in memory twice).

Run: .venv/bin/python benchmarks/bench_safetensors.py   (writes benchmarks/results/safetensors.json)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

NET = '''
from torch import nn
class Net(nn.Sequential):
    def __init__(self, layers=8, width=2048):
        super().__init__(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
'''

CASE = '''
import json, resource, sys, torch
import micronet_score.checkpoint, micronet_score.sources.safetensors_io as st
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
case, index = sys.argv[1], sys.argv[2]
if case == "headers":
    entries = st.SafetensorsWeights(index).entries()
    assert len(entries) == 8
elif case == "load_model":
    loaded = micronet_score.checkpoint.load_model(index, model="bench_net:Net")
else:
    from safetensors.torch import load_file
    import bench_net, pathlib
    folder = pathlib.Path(index).parent
    state = {}
    for shard in ("a.safetensors", "b.safetensors"):
        state.update(load_file(folder / shard))
    bench_net.Net().load_state_dict(state)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"case": case, "peak_above_baseline_mib": (peak - base) / 1024}))
'''


def main() -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bench_net.py").write_text(NET)
        sys.path.insert(0, tmp)
        import bench_net

        state = bench_net.Net().state_dict()
        names = list(state)
        shards = {"a.safetensors": names[:4], "b.safetensors": names[4:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, folder / shard)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
        size = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
        del state
        results = {"checkpoint_mib": size, "cases": []}
        for case in ("headers", "load_model", "whole"):
            done = subprocess.run([sys.executable, "-c", CASE, case, str(folder / "model.safetensors.index.json")],
                                  cwd=tmp, capture_output=True, text=True, check=True)
            results["cases"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results["note"] = "peak RSS (ru_maxrss) above the baseline after imports, one fresh process per case"
    out = Path(__file__).parent / "results" / "safetensors.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"checkpoint: {size:.0f} MiB")
    for case in results["cases"]:
        print(f"{case['case']:>10}: peak {case['peak_above_baseline_mib']:.0f} MiB above baseline")


if __name__ == "__main__":
    main()
