"""Jet generation from a pre-trained NTP model, with KV caches: `jetfm generate`.

    jetfm generate --checkpoint runs/joint/final --n-jets 10000 --out gen/joint
    jetfm generate --checkpoint runs/joint/final --n-jets 2000 --out gen/top --class Tbqq --top-k 500 --seed 3
    jetfm evaluate generative --generated gen/joint --reference data/toptag    # then judge them

Sampling, caches and conditioning: jetfm.sampling; the jet frame: jetfm.data.jetframe; loading the
checkpoint: jetfm.artifacts.exports. The method (tokens, the NTP objective, sampling): docs/METHOD.md §3–4.

Output (`generate_to_shards`): a standard shard set, split `generated`, one chunk per
`chunk_size` jets. Particles are physical, massless four-momenta (px, py, pz, E) in GeV:
decoded features -> tokenizer Preprocessing.inverse -> (pT, η_rel, φ_rel) ->
four_momenta_from_relative with the jet axis at η = φ = 0, i.e. **generated jets live in the
jet frame** (their absolute η/φ mean nothing; jetfm.evaluation puts reference jets in the same
frame). pT below PT_FLOOR (a decoded log-pT far below the data) is raised to PT_FLOOR and counted
in the manifest. Particles are sorted by pT within each jet (the shard contract); `tokens.npy`
holds each particle's sampled token id in the same row order. Jet features = summed
constituents (physics.jets_from_constituents). Labels: the requested (or drawn) class for a
class-conditioned model, with the training data's class names; otherwise 0 with classes
["generated"]. The manifest's `source` records checkpoint, tokenizer, sampling settings, seed
and the checkpoint's MLflow run; `tokens` describes the tokenizer as `jetfm data tokenize` does.
Non-finite values are an error before the batch holding them is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import messages
from .artifacts.exports import ExportError, load_pretrain, load_tokenizer_export, resolve_export_dir
from .artifacts.runs import find_run_record
from .data.features import Preprocessing
from .data.format import JET_FEATURES, KINEMATIC_FEATURES, DataError
from .data.jetframe import GENERATED_SPLIT, JET_FRAME, RELATIVE_FEATURES, to_physical
from .data.shards import Manifest, ShardSetWriter, creation_info
from .sampling import FeatureMap, GenerationError, check_request, choose_conditioning, generate_jets

__all__ = ["GENERATED_SPLIT", "GenerationError", "generate_to_shards", "load_pretrain_checkpoint",
           "resolve_checkpoint_dir", "write_jet_frame_shards", "add_generate_arguments", "run_generate", "main"]


# --------------------------------------------------------------------------- loading
def resolve_checkpoint_dir(path) -> Path:
    """The directory holding model.safetensors + config.yaml: PATH itself, or PATH/final (a run dir).
    A tokenizer's export or run dir (tokenizer.json) is the common mix-up: said so by name."""
    from .tokenizer.model import CONFIG_FILE as TOKENIZER_FILE

    for candidate in (Path(path), Path(path) / "final"):
        if (candidate / TOKENIZER_FILE).is_file():
            raise GenerationError(f"{path}: this is a tokenizer export; pass a pre-training run or its final/ "
                                  "(e.g. runs/joint-small/final: stage pretrain, objective ntp or joint)")
    try:
        return resolve_export_dir(path)
    except ExportError as error:
        raise GenerationError(str(error)) from None


def load_pretrain_checkpoint(path, *, device="cpu"):
    """(cfg, PretrainModel in eval mode, checkpoint dir) from a pretrain export; raises GenerationError
    unless it is a pre-training checkpoint with an NTP head. Attention runs on `auto` (the KV-cache
    step is single-query attention; flash-trained weights load unchanged)."""
    try:
        cfg, model, directory = load_pretrain(resolve_checkpoint_dir(path), device=device, attention="auto")
    except ExportError as error:
        raise GenerationError(f"{error}; generation needs a pre-training checkpoint") from None
    if not cfg.objective.uses_ntp or model.ntp is None:
        raise GenerationError(
            f"{directory}: this checkpoint has no NTP head (objective.name={cfg.objective.name}); generation needs a "
            "model pre-trained with objective ntp or joint"
        )
    return cfg, model, directory


def training_manifest(cfg) -> Manifest | None:
    """The manifest of the data the checkpoint was trained on, if it is still reachable."""
    path = getattr(cfg.data, "path", None)
    if not path:
        return None
    try:
        return Manifest.load(path)  # a directory or a URL
    except (DataError, OSError):
        return None


def resolve_tokenizer_dir(cfg, override=None, manifest: Manifest | None = None) -> Path:
    """--tokenizer, else the config's tokenizer.checkpoint, else the training data's tokens.tokenizer."""
    for candidate in (override, getattr(cfg.tokenizer, "checkpoint", None),
                      (manifest.tokens or {}).get("tokenizer") if manifest is not None else None):
        if candidate:
            return Path(candidate)
    raise GenerationError(
        "no tokenizer: the checkpoint's config has no tokenizer.checkpoint and its training data manifest "
        f"({getattr(cfg.data, 'path', None)}) is unreachable or records none; pass --tokenizer DIR"
    )


def check_tokenizer(model, cfg, tokenizer, tokenizer_dir, manifest: Manifest | None = None) -> None:
    """Raise TokenizerMismatchError unless the tokenizer fits the model: vocabulary (codebook + 2),
    the features it decodes (continuous input), and the training data's token description."""
    from .tokenizer.model import TokenizerMismatchError, check_manifest_tokens

    if tokenizer.codebook_size + 2 != model.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} has {tokenizer.codebook_size} codes (vocabulary {tokenizer.codebook_size + 2}) but "
            f"the checkpoint's NTP head predicts {model.vocab_size} token ids (codebook {model.vocab_size - 2})"
        )
    missing = [n for n in RELATIVE_FEATURES if n not in tokenizer.feature_names]
    if missing:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} decodes {tokenizer.feature_names}; turning generated particles into "
            f"four-momenta needs {list(RELATIVE_FEATURES)} (missing {missing})"
        )
    if model.model_cfg.input_mode == "continuous":
        FeatureMap(tokenizer.preprocessing, Preprocessing.from_config(cfg.data.features), str(tokenizer_dir))
    if manifest is not None and manifest.tokens:
        check_manifest_tokens(manifest, tokenizer, f"training data {cfg.data.path}", f"tokenizer {tokenizer_dir}")


# --------------------------------------------------------------------------- shards
def write_jet_frame_shards(out_dir, batches, *, classes, source: dict, tokens: dict | None = None,
                           max_particles: int = 128, jets_per_shard: int = 10000, chunk_size: int = 1000,
                           split: str = GENERATED_SPLIT) -> Manifest:
    """Write an iterable of JetArrays (jet-frame, physical) as a shard set; returns its manifest.
    Every finished shard is listed in the manifest at once (an interrupted run keeps whole shards)."""
    out_dir = Path(out_dir)
    manifest = Manifest(source={**source, "frame": JET_FRAME}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=list(classes), max_particles=int(max_particles),
                        chunk_size=chunk_size, created_by=creation_info(), tokens=tokens)
    writer = ShardSetWriter(out_dir, split, manifest, jets_per_shard=jets_per_shard, save_each=True)
    try:
        for jets in batches:
            writer.write(jets)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    manifest.save(out_dir)
    return manifest


def generate_to_shards(
    checkpoint_dir,
    out_dir,
    n_jets: int,
    *,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    class_name: str | None = None,
    multiplicity: int | None = None,
    max_length: int | None = None,
    min_length: int = 1,
    device: str = "cpu",
    tokenizer_dir=None,
    jets_per_shard: int = 10000,
    use_cache: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Generate `n_jets` jets from a pre-training checkpoint into the shard set OUT (split
    `generated`). Returns its manifest. See the module docstring for the output conventions."""
    from .tokenizer.tokenize import tokens_description

    out_dir = Path(out_dir)
    if (out_dir / Manifest.FILENAME).exists() or (out_dir / GENERATED_SPLIT).exists():
        if not overwrite:
            raise GenerationError(f"{out_dir} already holds generated jets; choose a new --out or pass --overwrite")
        (out_dir / Manifest.FILENAME).unlink(missing_ok=True)
        shutil.rmtree(out_dir / GENERATED_SPLIT, ignore_errors=True)
    if n_jets < 1:
        raise GenerationError(f"--n-jets must be >= 1, got {n_jets}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA GPU here")
    cfg, model, checkpoint = load_pretrain_checkpoint(checkpoint_dir, device=device)
    manifest = training_manifest(cfg)
    tok_dir = resolve_tokenizer_dir(cfg, tokenizer_dir, manifest)
    tokenizer = load_tokenizer_export(tok_dir, device=device)
    check_tokenizer(model, cfg, tokenizer, tok_dir, manifest)
    recorded = [Path(p).resolve() for p in (getattr(cfg.tokenizer, "checkpoint", None),
                                            (manifest.tokens or {}).get("tokenizer") if manifest is not None else None) if p]
    if recorded and Path(tok_dir).resolve() not in recorded:
        warnings.warn(f"tokenizer {tok_dir} is not the one recorded for this checkpoint ({recorded[0]}); codebook size "
                      "and features match, but if it was trained separately its token ids mean other particles",
                      stacklevel=2)
    fmap = FeatureMap(tokenizer.preprocessing, Preprocessing.from_config(cfg.data.features), str(tok_dir)) \
        if model.model_cfg.input_mode == "continuous" else None
    limit = model.model_cfg.max_particles if max_length is None else int(max_length)
    labels, mult, classes, how = choose_conditioning(model, cfg, manifest, n_jets, class_name, multiplicity, seed, limit)
    L = check_request(model, max_length=max_length, min_length=min_length, labels=labels, multiplicity=mult)
    run = find_run_record(checkpoint)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_length": L, "min_length": min_length,
                "batch_size": batch_size, "use_cache": use_cache, "device": str(device),
                "class": class_name, "multiplicity": multiplicity, "conditioning": model.model_cfg.conditioning,
                "conditioning_values": how}
    source = {"kind": "generated", "checkpoint": str(checkpoint.resolve()), "tokenizer": str(Path(tok_dir).resolve()),
              "sampling": sampling, "seed": seed, "input_mode": model.model_cfg.input_mode,
              "mlflow": run, "experiment": cfg.tracking.experiment, "name": cfg.name}

    from tqdm.auto import tqdm

    bar = tqdm(total=n_jets, unit="jet", desc="generate", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = {"n_jets": 0, "n_stopped": 0, "n_length_limit": 0, "pt_clamped": 0, "jets_not_pt_ordered": 0}
    started = time.perf_counter()

    def batches():
        # a few model batches per write, so progress, memory and shard writes stay smooth
        group = max(batch_size, min(4 * batch_size, jets_per_shard))
        for first in range(0, n_jets, group):
            n = min(group, n_jets - first)
            rows = slice(first, first + n)
            generated = generate_jets(
                model, tokenizer, n, batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                max_length=L, min_length=min_length, generator=generator,
                labels=None if labels is None else labels[rows], multiplicity=None if mult is None else mult[rows],
                use_cache=use_cache, input_features=fmap, progress=bar,
            )
            jets, info = to_physical(generated, tokenizer, labels=np.zeros(n, np.int64) if labels is None else labels[rows])
            counts["n_jets"] += n
            counts["n_stopped"] += int(generated.stopped.sum())
            counts["n_length_limit"] += int((~generated.stopped).sum())
            for key, value in info.items():
                counts[key] += value
            bar.set_postfix(particles=f"{int(generated.lengths.float().mean())}/jet", refresh=False)
            yield jets

    try:
        result = write_jet_frame_shards(
            out_dir, batches(), classes=classes, source=source, tokens=tokens_description(tokenizer, tok_dir),
            max_particles=L, jets_per_shard=jets_per_shard,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    result.source.update(counts, seconds=round(seconds, 3), jets_per_s=round(n_jets / max(seconds, 1e-9), 2))
    result.save(out_dir)
    return result


# --------------------------------------------------------------------------- command line
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="pre-training export (run_dir/final: model.safetensors + config.yaml) or its run dir")
    parser.add_argument("--n-jets", type=int, required=True, metavar="N", help="jets to generate")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard set (split 'generated')")
    parser.add_argument("--batch-size", type=int, default=256, metavar="B", help="jets sampled together (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most probable tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: smallest set holding P")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="class of every jet (class-conditioned models; default: drawn like the training data)")
    parser.add_argument("--multiplicity", type=int, default=None, metavar="N",
                        help="particles per jet (multiplicity-conditioned models; default: drawn from the training data)")
    parser.add_argument("--max-length", type=int, default=None, metavar="L",
                        help="length limit in particles (default and maximum: model.max_particles)")
    parser.add_argument("--min-length", type=int, default=1, metavar="L",
                        help="stop is not sampled before L particles (default 1; = --max-length forces the length)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer directory (default: config tokenizer.checkpoint or the data manifest's)")
    parser.add_argument("--jets-per-shard", type=int, default=10000, help="jets per output shard (default 10000)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (reference, slow)")
    parser.add_argument("--overwrite", action="store_true", help="replace jets already generated in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_generate(args) -> int:
    from .config import ConfigError
    from .tokenizer.model import TokenizerMismatchError

    try:
        manifest = generate_to_shards(
            args.checkpoint, args.out, args.n_jets, batch_size=args.batch_size, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, class_name=args.class_name,
            multiplicity=args.multiplicity, max_length=args.max_length, min_length=args.min_length, device=args.device,
            tokenizer_dir=args.tokenizer, jets_per_shard=args.jets_per_shard, use_cache=not args.no_cache,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (GenerationError, TokenizerMismatchError, ConfigError, DataError, FileNotFoundError) as error:
        messages.error(str(error))
        return 2
    s = manifest.source
    messages.output(f"{args.out}: {s['n_jets']} jets ({s['n_stopped']} stopped, {s['n_length_limit']} at the length limit "
          f"{s['sampling']['max_length']}) in {s['seconds']:.1f} s, {s['jets_per_s']:.1f} jets/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
