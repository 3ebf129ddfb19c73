"""Tokenizer throughput: jets/s to encode, to decode, and to decode incrementally (KV cache).

    python benchmarks/tokenize_throughput.py                        # reference size, CPU, batch 500
    python benchmarks/tokenize_throughput.py --threads 2 --data data/toptag --tokenizer runs/tok/final
    python benchmarks/tokenize_throughput.py --device cuda --repeats 20

Model: the reference tokenizer (TokenizerConfig defaults: hidden 128, 8 heads, 4+4 blocks,
latent 8, 8192 codes) — randomly initialised unless --tokenizer names a trained one (speed does
not depend on the weights). Jets: --data (a shard set, its first --jets jets) or synthetic
multiplicities ~ Poisson(--mean-particles) clipped to [1, 128] (Pythia top-tagging jets
average ≈ 65 constituents). Each measurement: one warm-up pass, then --repeats timed passes
over the same batches, device synchronised. Prints a table and, as the last line, JSON with
hardware, versions and settings.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jetfm.tokenizer import TokenizerConfig, load_tokenizer  # noqa: E402
from jetfm.tokenizer.model import ParticleTokenizer, packing_for  # noqa: E402


def synthetic_batches(n_jets: int, batch_size: int, mean_particles: float, n_features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n_jets, batch_size):
        n = min(batch_size, n_jets - start)
        lengths = np.clip(rng.poisson(mean_particles, n), 1, 128)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        batches.append((torch.from_numpy(rng.normal(0, 1, (int(cu[-1]), n_features)).astype(np.float32)), cu))
    return batches


def shard_batches(data_dir: str, model: ParticleTokenizer, n_jets: int, batch_size: int):
    """Features exactly as `jetfm data tokenize` computes them (full-jet axis, then truncation)."""
    from jetfm.data.features import particle_features
    from jetfm.data.format import JetArrays
    from jetfm.data.reader import iterate_jets, truncation_rows
    from jetfm.data.shards import Manifest

    manifest = Manifest.load(data_dir)
    split = "train" if "train" in manifest.splits else next(iter(manifest.splits))
    chunks, total = [], 0
    for jets in iterate_jets(data_dir, split):
        chunks.append(jets)
        total += len(jets)
        if total >= n_jets:
            break
    jets = JetArrays.concat(chunks).select(np.arange(min(n_jets, total)))
    raw = particle_features(jets.part, jets.offsets, manifest.particle_features, model.feature_names)
    offsets = jets.offsets
    cut = truncation_rows(offsets, model.max_particles)
    if cut is not None:
        raw, offsets = raw[cut[0]], cut[1]
    x = model.preprocessing.forward(raw)
    batches = []
    for start in range(0, len(offsets) - 1, batch_size):
        stop = min(start + batch_size, len(offsets) - 1)
        cu = torch.from_numpy((offsets[start : stop + 1] - offsets[start]).astype(np.int32))
        batches.append((torch.from_numpy(x[offsets[start] : offsets[stop]]), cu))
    return batches


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="trained tokenizer directory (default: reference config, random weights)")
    parser.add_argument("--data", default=None, help="shard set to take jets from (default: synthetic multiplicities)")
    parser.add_argument("--jets", type=int, default=2000, help="jets per timed pass (default 2000)")
    parser.add_argument("--batch-size", type=int, default=500, help="jets per encoder batch (default 500)")
    parser.add_argument("--mean-particles", type=float, default=65.0,
                        help="mean multiplicity of the synthetic jets (Poisson, default 65; ignored with --data)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--skip-incremental", action="store_true",
                        help="skip the particle-by-particle (KV-cached) decoder measurement")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.tokenizer:
        model = load_tokenizer(args.tokenizer, device=device)
    else:
        model = ParticleTokenizer(TokenizerConfig()).to(device).eval()
    if args.data:
        batches = shard_batches(args.data, model, args.jets, args.batch_size)
    else:
        batches = synthetic_batches(args.jets, args.batch_size, args.mean_particles, model.n_features)
    batches = [(x.to(device), cu.to(device)) for x, cu in batches]
    n_jets = sum(cu.numel() - 1 for _, cu in batches)
    n_particles = sum(x.shape[0] for x, _ in batches)
    tokens = [model.encode(x, cu) for x, cu in batches]

    def encode():
        for x, cu in batches:
            model.encode(x, cu)

    def decode():
        for ids, (_, cu) in zip(tokens, batches):
            model.decode(ids, cu)

    def decode_incremental():
        for ids, (_, cu) in zip(tokens, batches):
            packing = packing_for(cu, ids.shape[0])
            ids_BN = packing.pad(ids)
            ids_BN[~packing.pad(torch.ones_like(ids, dtype=torch.bool))] = 1
            cache = model.new_cache(packing.num_seqs, capacity=packing.max_seqlen)
            for i in range(packing.max_seqlen):
                model.decode_step(cache, ids_BN[:, i])

    rows = []
    tasks = [("encode", encode), ("decode (full, causal)", decode)]
    if not args.skip_incremental:
        tasks.append(("decode (incremental, KV cache)", decode_incremental))
    for name, fn in tasks:
        times = timed(fn, args.repeats, device)
        best, median = min(times), statistics.median(times)
        rows.append({"task": name, "jets_per_s": n_jets / median, "jets_per_s_best": n_jets / best,
                     "particles_per_s": n_particles / median, "seconds_median": median})

    print(f"tokenizer throughput — {n_jets} jets ({n_particles / n_jets:.1f} particles/jet), batch {args.batch_size}, "
          f"{model.codebook_size} codes, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{args.device}, {args.threads} thread(s)")
    print(f"{'task':<34}{'jets/s':>12}{'best jets/s':>14}{'particles/s':>14}")
    for row in rows:
        print(f"{row['task']:<34}{row['jets_per_s']:>12.0f}{row['jets_per_s_best']:>14.0f}{row['particles_per_s']:>14.0f}")
    record = {
        "benchmark": "tokenize_throughput",
        "results": rows,
        "settings": {**vars(args), "n_jets": n_jets, "mean_particles_measured": n_particles / n_jets,
                     "codebook_size": model.codebook_size, "hidden_dim": model.cfg.hidden_dim,
                     "blocks": [model.cfg.encoder_blocks, model.cfg.decoder_blocks]},
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
