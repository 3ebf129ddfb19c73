"""`jetfm demo`: the whole chain, small, on jets generated here — the README's main job.

    jetfm demo --out runs/demo            # ~5 minutes on a 2-core laptop CPU

1. Pythia 8 + FastJet: top vs QCD jets (toptag preset) -> OUT/data
2. VQ-VAE tokenizer (configs/demo_tokenizer.yaml) -> OUT/tokenizer/final
3. tokenize the shards (token ids + reconstructed features) -> OUT/data-tokens
4. joint NTP + MPM pre-training (configs/demo_joint.yaml) -> OUT/joint/final

Every step is resumable: rerunning the command continues where it stopped. Training runs are
tracked in MLflow (sqlite under each run directory; `mlflow ui --backend-store-uri
sqlite:///OUT/joint/mlflow.db`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--jets", type=int, default=1000,
                        help="training jets per class to generate (default 1000; val/test get a fifth each)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each training stage (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="Pythia worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generation and training (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the small models (default 1: their steps are too small to gain from "
                             "more, and spinning OpenMP threads slow down badly when a laptop is busy)")


def _config(name: str, out: Path, data: Path, steps: int, seed: int, extra: list[str] = ()):
    from .config import load_config

    path = CONFIGS / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: demo config missing; run the demo from a source checkout (pip install -e .)")
    return load_config(path, [f"data.path={data}", f"out_dir={out}", f"train.max_steps={steps}",
                              f"train.eval_every={max(1, steps // 2)}", f"train.checkpoint_every={max(1, steps // 2)}",
                              f"seed={seed}", *extra])


def run_demo(args) -> int:
    from . import train as trainer
    from .data.generate import generate_dataset
    from .tokenizer.tokenize import tokenize_dataset

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data, tokens = out / "data", out / "data-tokens"
    per_split = {"train": args.jets, "val": max(1, args.jets // 5), "test": max(1, args.jets // 5)}

    print(f"[1/4] generating top and QCD jets with Pythia 8 -> {data}")
    generate_dataset(data, preset="toptag", jets_per_class=per_split, workers=args.workers, seed=args.seed)

    print(f"[2/4] training the tokenizer -> {out / 'tokenizer'}")
    cfg = _config("demo_tokenizer.yaml", out / "tokenizer", data, args.steps, args.seed)
    status = trainer.train(cfg, resume="auto")
    if status != 0:
        return status

    print(f"[3/4] tokenizing -> {tokens}")
    tokenize_dataset(out / "tokenizer" / "final", data, tokens, with_reco=True)

    print(f"[4/4] joint NTP + MPM pre-training -> {out / 'joint'}")
    cfg = _config("demo_joint.yaml", out / "joint", tokens, args.steps, args.seed)
    status = trainer.train(cfg, resume="auto")
    if status == 0:
        print(f"done: pre-trained model in {out / 'joint' / 'final'}; metrics in {out}/*/metrics.jsonl and MLflow")
    return status
