"""Generation throughput: jets/s with the KV caches vs the full-prefix recompute of the reference.

    python benchmarks/generate_throughput.py                               # batch 64, length 100, both input modes
    python benchmarks/generate_throughput.py --batch-sizes 64,256 --modes continuous --ref-iters 1
    python benchmarks/generate_throughput.py --device cuda --batch-sizes 256,1024

Models at the reference size with random (untrained) weights, which is all speed needs:
backbone 8 blocks x 128 (8 heads, MLP x4) + NTP head 2 blocks (MLP x2) over the 8194-token
vocabulary; tokenizer 4 + 4 blocks x 128, codebook 8192, latent 8. Every jet is forced to the
full length (`min_length = max_length`: stop is never sampled), so both paths do the same number
of steps. Modes: `continuous` (each sampled token decoded by the tokenizer's causal decoder and
fed back as features: the paper's hybrid) and `token` (token ids fed back).

- cached: `generate_jets(use_cache=True)` — backbone + head KV cache, decoder KV cache, one new
  position per step.
- recompute: `generate_jets(use_cache=False)` — the reference algorithm: each step re-decodes
  the whole prefix and re-runs backbone + head on it (projecting only the last position onto
  the vocabulary, so this baseline is a little faster than the reference's full-logits pass).

Ratios in the final JSON line: `speedup_vs_reference` = cached jets/s / the reference
implementation's jets/s for the same workload (continuous input, length 100, batch 64 or 256),
stored in `benchmarks/results/reference.json` for this CPU type (`reference_figures.py`);
`speedup_vs_padded` = cached / jetfm's own
recompute baseline in the same run (the robust figure on a loaded machine; needs --ref-iters >= 1).

On CPU (fp32) the cached path runs the KV cache's compiled kernels (model.attention=auto;
jetfm/models/kernels/kv_decode.cpp: one-query attention and whole block steps in C++, built on
first use, ~30 s, then cached, see docs/SPEED.md); the JSON line records whether they ran and how
long loading them took. `--no-kernel` builds the models with model.attention=sdpa, the plain torch
path (SDPA and Python block steps: the fallback of machines without a compiler), for an A/B.

Warm-up runs (shorter: 8 positions) precede the timed ones; times are wall-clock with the
device synchronised; CPU seconds of the process are printed too (the machine may be shared).
Prints a table, then one JSON line with hardware, versions and config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference_figures  # noqa: E402  (benchmarks/, the script's own directory)
from jetfm.generate import generate_jets  # noqa: E402
from jetfm.models.attention import KVCache  # noqa: E402
from jetfm.models.config import ModelConfig, ObjectiveConfig  # noqa: E402
from jetfm.models.pretrain import PretrainModel  # noqa: E402
from jetfm.tokenizer.config import TokenizerConfig  # noqa: E402
from jetfm.tokenizer.model import ParticleTokenizer  # noqa: E402


def build(mode: str, device, codebook: int, attention: str = "auto"):
    torch.manual_seed(0)
    model = PretrainModel(
        ModelConfig(dim=128, num_heads=8, num_blocks=8, head_blocks=2, input_mode=mode, max_particles=128,
                    attention=attention),
        ObjectiveConfig(name="ntp"), vocab_size=codebook + 2, num_features=3,
    ).to(device).eval()
    tokenizer = ParticleTokenizer(TokenizerConfig(codebook_size=codebook, attention=attention)).to(device).eval()
    return model, tokenizer


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(model, tokenizer, *, batch: int, length: int, use_cache: bool, iters: int, warmup: int, device):
    def once(L):
        generator = torch.Generator(device=device).manual_seed(0)
        out = generate_jets(model, tokenizer, batch, batch_size=batch, max_length=L, min_length=L,
                            generator=generator, use_cache=use_cache)
        assert int(out.lengths.min()) == L, "every jet must run to the forced length"

    for _ in range(warmup):
        once(min(8, length))
    times = [timed(lambda: once(length), device) for _ in range(iters)]
    wall = statistics.median(t[0] for t in times)
    cpu = statistics.median(t[1] for t in times)
    return {"batch": batch, "length": length, "cache": use_cache, "iters": iters, "seconds": wall,
            "cpu_seconds": cpu, "jets_per_s": batch / wall, "particles_per_s": batch * length / wall,
            "jets_per_cpu_s": batch / max(cpu, 1e-9)}


def hardware(device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="64", help="comma-separated jets per batch (default 64)")
    parser.add_argument("--length", type=int, default=100, help="particles per jet, forced (default 100)")
    parser.add_argument("--modes", default="continuous,token", help="input modes (default continuous,token)")
    parser.add_argument("--codebook", type=int, default=8192, help="codebook size (default 8192)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs of the cached path (median)")
    parser.add_argument("--ref-iters", type=int, default=1, help="timed runs of the recompute path (0 skips it)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs per configuration")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-kernel", action="store_true",
                        help="the plain torch path: models built with attention=sdpa (no compiled kernels)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    kernel = {"available": not args.no_kernel and KVCache._kernel() is not None,
              "load_seconds": round(time.perf_counter() - started, 2)}
    print(f"KV cache kernels: {'loaded' if kernel['available'] else 'off'} ({kernel['load_seconds']} s)",
          file=sys.stderr, flush=True)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        # built outside inference mode, as `jetfm generate` loads a checkpoint (inference tensors
        # keep no version counter, so generation would re-pack their weights for every batch)
        model, tokenizer = build(mode, device, args.codebook, attention="sdpa" if args.no_kernel else "auto")
        with torch.inference_mode():
            for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
                cached = run(model, tokenizer, batch=batch, length=args.length, use_cache=True, iters=args.iters,
                             warmup=args.warmup, device=device)
                row = {"mode": mode, **cached}
                results.append(row)
                print(f"{mode:>10} batch {batch:>5} cached    {cached['jets_per_s']:9.2f} jets/s "
                      f"({cached['seconds']:.2f} s, {cached['cpu_seconds']:.2f} CPU s)", file=sys.stderr, flush=True)
                if args.ref_iters:
                    ref = run(model, tokenizer, batch=batch, length=args.length, use_cache=False,
                              iters=args.ref_iters, warmup=args.warmup, device=device)
                    results.append({"mode": mode, **ref})
                    row["speedup"] = ref["seconds"] / cached["seconds"]
                    row["speedup_cpu"] = ref["cpu_seconds"] / max(cached["cpu_seconds"], 1e-9)
                    print(f"{mode:>10} batch {batch:>5} recompute {ref['jets_per_s']:9.2f} jets/s "
                          f"({ref['seconds']:.2f} s, {ref['cpu_seconds']:.2f} CPU s)", file=sys.stderr, flush=True)

    print(f"\nGeneration throughput, reference size (8x128 backbone + 2-block NTP head, tokenizer 4+4x128, "
          f"codebook {args.codebook}), length {args.length} forced, {device}\n")
    print("| input | batch | path | jets/s | particles/s | s / batch | CPU s / batch | speed-up |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        speed = f"{r['speedup']:.1f}x (CPU {r['speedup_cpu']:.1f}x)" if "speedup" in r else ""
        print(f"| {r['mode']} | {r['batch']} | {'KV cache' if r['cache'] else 'recompute'} | {r['jets_per_s']:.2f} | "
              f"{r['particles_per_s']:.0f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {speed} |")
    config = {"length": args.length, "codebook": args.codebook, "iters": args.iters, "ref_iters": args.ref_iters,
              "warmup": args.warmup, "backbone": "8x128, 8 heads, MLP x4; NTP head 2 blocks MLP x2",
              "tokenizer": "4+4 blocks x128, 8 heads, latent 8", "kernel": kernel}
    entry, why = (reference_figures.pick(reference_figures.load()) if device.type == "cpu"  # by this CPU's flags
                  else (None, "none: the stored reference figures are CPU figures"))
    reference = (entry or {}).get("generate", {})
    print(f"reference figures: {why}")
    vs_reference, vs_padded = {}, {}
    for r in results:
        if not r["cache"]:
            continue
        key = f"{r['mode']}/batch{r['batch']}/length{r['length']}"
        if key in reference:
            vs_reference[key] = r["jets_per_s"] / reference[key]["jets_per_s"]
            print(f"vs reference ({reference[key]['jets_per_s']} jets/s stored), {key}: x{vs_reference[key]:.0f}")
        if "speedup" in r:
            vs_padded[key] = r["speedup"]
    hw = hardware(device)
    try:
        hw["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    print(json.dumps({"benchmark": "generate_throughput", "hardware": hw, "config": config,
                      "reference_machine": {"name": entry and entry["name"], "measured": entry and entry["measured"], "why": why},
                      "results": results, "speedup_vs_reference": vs_reference, "speedup_vs_padded": vs_padded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
