"""Step CPU time and RSS of one SFT step per packed micro-batch shape (issue 18 item 3 diagnosis).

One process per setting; run, e.g. (TUNE=1 applies fedtune.native_memory.tune as the CLI does):

    TUNE=1 PYTHONPATH=src python benchmarks/shape_memory.py bf16 var /path/to/tiny-llama 30

PRECISION fp32|bf16; MODE fixed (4 x L every step), var (4 random lengths in [L/2, L)),
bucket (var, total padded up to a multiple of 64 by lengthening the last example),
seg64 (every example a multiple of 64: a bounded set of shapes). Prints the median step
CPU time (process_time: the machine is shared) and a per-step trace "cpu-seconds/current RSS MB".
Findings: benchmarks/results/shape_memory.json.
"""
# ruff: noqa: E401, E701, E702, E731
import sys, time, resource, os
import torch
if os.environ.get("TUNE"):
    from fedtune.native_memory import bound_kernel_caches, tune; tune(); bound_kernel_caches()
from fedtune.config import load_config
from fedtune.data.prompts import Encoded
from fedtune.federation import setup

prec, mode, model, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def cur():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**20
cfg = load_config(None, [f"train.precision={prec}", f"model.name={model}", "train.batch_size=4"])
bundle = setup.build_model(cfg)
tr = setup.build_trainer(cfg, bundle)
gen = torch.Generator().manual_seed(0)
L = int(sys.argv[5]) if len(sys.argv) > 5 else 256
def batch(lengths):
    items = [Encoded(torch.randint(0, 49000, (n,), generator=gen), 16) for n in lengths]
    b = tr.make_batch(items)
    return [b], int((b["labels"][:, 1:] != -100).sum())
tr.model.train()
tr._step(*batch([L]*4), 1e-4)
times = []; trace = []
for s in range(steps):
    if mode == "fixed": lens = [L]*4
    elif mode == "bucket":
        lens = [int(x) for x in torch.randint(L // 2, L, (4,), generator=gen)]; lens[-1] += (-sum(lens)) % 64
    elif mode == "seg64":
        lens = [64 * int(x) for x in torch.randint(L // 128, L // 64 + 1, (4,), generator=gen)]
    elif mode == "vartotal":  # segments fixed-ish but total varies: vary only last
        lens = [L, L, L, L - 7 * (s + 1)]
    else: lens = [int(x) for x in torch.randint(L // 2, L, (4,), generator=gen)]
    t = time.process_time(); tr._step(*batch(lens), 1e-4); times.append(time.process_time() - t); trace.append(f'{times[-1]:.2f}s/{cur():.0f}')
times.sort()
print(f"{prec:5s} {mode:8s} {model[-20:]:20s} median {times[len(times)//2]:.3f}s min {times[0]:.3f}s peak {rss():.0f}MB cur {cur():.0f}MB precision={bundle.precision}", flush=True)
print('  trace', ' '.join(trace))
