"""A/B of the training step with jetfm's CPU kernels against the plain torch path, interleaved in one process.

    python benchmarks/fast_paths_ab.py                        # batch 64, bf16, 2 threads, 4 pairs
    python benchmarks/fast_paths_ab.py --batch-size 250 --pairs 2 --threads 2
    python benchmarks/fast_paths_ab.py --against no-thread-split --pairs 14   # the thread split alone

Why one process with alternating steps: on a shared machine the load changes from minute to
minute, so two separate runs compare the load, not the code. Two models with the same weights
alternate steps: `model.attention=auto` (the fast paths: the C attention kernel on packed jets,
fused dropout-add, the C cross-entropy inside the chunked vocabulary loss, the step split over
threads) and `model.attention=sdpa` (bucketed torch SDPA, random-bits dropout, torch ops in the
chunked loss, one pass); both use the trainer's AdamW. `--against no-thread-split`: the plain
model is the fast one without the step split over threads (`PretrainModel.thread_split = False`:
one pass, torch's threads inside each op), so the pair measures the split alone. The medians of
CPU and wall time per step are printed, then one JSON line. Workload: the reference's (joint
step, reference size, multiplicities clip(round(Gamma(6.5, 7)), 5, 99), dropout 0.1, AdamW, bf16
autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jetfm.models.config import ModelConfig, ObjectiveConfig  # noqa: E402
from jetfm.models.pretrain import build_pretrain_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4, help="timed (fast, plain) pairs, order alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--against", default="sdpa", choices=["sdpa", "no-thread-split"],
                   help="the plain side: model.attention=sdpa (every CPU fast path off) or the fast model "
                        "without the thread split")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = tt.sample_multiplicities(SimpleNamespace(seed=args.seed, data=None, multiplicities="gamma",
                                                       max_particles=128), args.batch_size)
    batch = tt.make_batch(lengths, args.seed, 8192)
    models, optimizers = {}, {}
    for name, attention in (("fast", "auto"), ("plain", "sdpa" if args.against == "sdpa" else "auto")):
        cfg = SimpleNamespace(model=ModelConfig(**tt.SIZES["ref"], attention=attention), objective=ObjectiveConfig(name="joint"),
                              data=SimpleNamespace(features={f"f{i}": {} for i in range(tt.NUM_FEATURES)}, inputs="raw"))
        torch.manual_seed(args.seed)  # same initial weights
        models[name] = build_pretrain_model(cfg, SimpleNamespace(tokens={"codebook_size": 8192}, classes=[])).train()
        models[name].thread_split = name == "fast" or args.against == "sdpa"
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3, weight_decay=1e-2)

    def step(name):
        model, opt = models[name], optimizers[name]
        cpu, wall = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - cpu, time.perf_counter() - wall

    step("fast"), step("plain")  # warm-up (the first fast step builds the kernels if needed)
    times = {"fast": [], "plain": []}
    for i in range(args.pairs):
        for name in (("fast", "plain") if i % 2 == 0 else ("plain", "fast")):
            times[name].append(step(name))
    T = sum(lengths)
    result = {}
    for name, rows in times.items():
        cpu, wall = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        result[name] = {"cpu_ms": 1e3 * cpu, "wall_ms": 1e3 * wall, "particles_per_s": T / wall, "particles_per_cpu_s": T / cpu}
        print(f"{name:5s} batch {args.batch_size} {args.dtype} {args.threads} threads: {1e3 * cpu:.0f} CPU-ms, "
              f"{1e3 * wall:.0f} ms wall per step -> {T / wall:.0f} particles/s")
    speedup = result["plain"]["wall_ms"] / result["fast"]["wall_ms"]
    print(f"fast vs plain: x{speedup:.2f} wall, x{result['plain']['cpu_ms'] / result['fast']['cpu_ms']:.2f} CPU")
    print(json.dumps({"benchmark": "fast_paths_ab", "config": vars(args), "particles": T, "results": result,
                      "speedup_fast_vs_plain": speedup, "loadavg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
