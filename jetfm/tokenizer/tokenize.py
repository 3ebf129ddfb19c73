"""`jetfm data tokenize`: add token ids (and optionally reconstructed features) to a shard set.

    jetfm data tokenize --tokenizer runs/tokenizer/final --data data/toptag --out data/toptag-tokens
    jetfm data tokenize ... --splits train,val --batch-size 500 --device cuda --with-reco

Reads every shard of DATA (the reader's validated chunks), computes the tokenizer's features
exactly as the loader does (particle_features on the stored jets — jet axis = sum of all stored
constituents — then truncation to the tokenizer's max_particles, then Preprocessing.forward),
encodes the jets in batches in stored pT order, and writes a NEW shard set OUT with the same
jets (particles beyond max_particles dropped, so that token rows align; stored shards are
normally truncated already) plus

    tokens.npy  int32 (T,)    code + 1 (1..K) of every particle
    reco.npy    float32 (T, F) with --with-reco: the tokenizer's reconstruction (decoded from the
                               tokens, causally in pT order) in PHYSICAL units of the tokenizer's
                               features (Preprocessing inverted), columns = manifest reco_features

OUT/manifest.json records `tokens = {codebook_size, tokenizer, features, preprocessing,
max_particles}` and `reco_features`. Shards are written atomically one by one and the manifest
is saved after each, so an interrupted run resumes by rerunning the same command.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import messages
from ..data.features import particle_features
from ..data.format import DataError
from ..data.reader import read_shard_chunks, truncation_rows
from ..data.remote import location, resolved
from ..data.shards import Manifest, ShardWriter, creation_info
from .model import (
    ParticleTokenizer,
    TokenizerMismatchError,
    check_features_match,
    load_tokenizer,
    preprocessing_spec,
)


def tokens_description(model: ParticleTokenizer, tokenizer_dir) -> dict:
    """The manifest's `tokens` entry for shards tokenized by `model`."""
    return {
        "codebook_size": model.codebook_size,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "features": list(model.feature_names),
        "preprocessing": preprocessing_spec(model.preprocessing),
        "max_particles": model.max_particles,
    }


@torch.no_grad()
def tokenize_jets(model: ParticleTokenizer, jets, stored_features, *, batch_size: int = 500, device="cpu",
                  with_reco: bool = False):
    """(truncated jets, tokens (T,) int32, reco (T, F) float32 physical | None) for one JetArrays."""
    raw = particle_features(jets.part, jets.offsets, stored_features, model.feature_names)
    cut = truncation_rows(jets.offsets, model.max_particles)
    if cut is not None:
        rows, offsets = cut
        raw = raw[rows]
        jets = replace(jets, part=jets.part[rows], offsets=offsets, tokens=None, reco=None)
    x = model.preprocessing.forward(raw)
    offsets = jets.offsets
    tokens = np.empty(len(x), np.int32)
    reco = np.empty((len(x), model.n_features), np.float32) if with_reco else None
    for start in range(0, len(jets), batch_size):
        stop = min(start + batch_size, len(jets))
        first, last = int(offsets[start]), int(offsets[stop])
        cu = torch.from_numpy((offsets[start : stop + 1] - first).astype(np.int32)).to(device)
        x_TF = torch.from_numpy(x[first:last]).to(device)
        ids = model.encode(x_TF, cu)
        tokens[first:last] = ids.cpu().numpy()
        if with_reco:
            reco[first:last] = model.preprocessing.inverse(model.decode(ids, cu).float().cpu().numpy())
    return replace(jets, tokens=tokens, reco=reco), tokens, reco


def _output_manifest(out_dir: Path, source: Manifest, data_dir: Path, tokens: dict, reco_features) -> Manifest:
    if (out_dir / Manifest.FILENAME).exists():
        existing = Manifest.load(out_dir)
        where = str(out_dir / Manifest.FILENAME)
        existing.compatible_with(source, f"{data_dir} vs {where}")
        old = existing.tokens or {}
        if old.get("codebook_size") != tokens["codebook_size"] or old.get("tokenizer") != tokens["tokenizer"]:
            raise DataError(
                f"{where}: holds tokens of tokenizer {old.get('tokenizer')} ({old.get('codebook_size')} codes), "
                f"this run uses {tokens['tokenizer']} ({tokens['codebook_size']} codes); choose a new --out"
            )
        check_features_match(tokens["preprocessing"], old.get("preprocessing") or {}, "tokenizer", where)
        if existing.reco_features != reco_features:
            raise DataError(
                f"{where}: reco_features {existing.reco_features}, this run writes {reco_features} "
                "(--with-reco must match the interrupted run)"
            )
        return existing
    return Manifest(
        source={**source.source, "tokenized_from": resolved(data_dir)},
        particle_features=list(source.particle_features),
        jet_features=list(source.jet_features),
        classes=list(source.classes),
        max_particles=min(source.max_particles, tokens["max_particles"]),
        chunk_size=source.chunk_size,
        created_by=creation_info(),
        tokens=tokens,
        reco_features=reco_features,
    )


def tokenize_dataset(
    tokenizer_dir,
    data_dir,
    out_dir,
    splits: list[str] | None = None,
    batch_size: int = 500,
    device: str = "cpu",
    with_reco: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write OUT = DATA + tokens (+ reco); resumable shard by shard. Returns OUT's manifest."""
    data_dir, out_dir = location(data_dir), Path(out_dir)  # data may be a URL (data/remote.py)
    if resolved(data_dir) == str(out_dir.resolve()):
        raise DataError(f"{out_dir}: --out must differ from --data (tokenizing writes a new shard set)")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    source = Manifest.load(data_dir)
    model = load_tokenizer(tokenizer_dir, device=device)
    for name in model.feature_names:  # fail now, naming both, rather than inside a shard
        try:
            particle_features(np.zeros((0, len(source.particle_features)), np.float32), np.zeros(1, np.int64),
                              source.particle_features, [name])
        except KeyError as error:
            raise TokenizerMismatchError(
                f"tokenizer {tokenizer_dir} needs feature {name!r}; {data_dir} stores {source.particle_features}: {error}"
            ) from error
    splits = list(source.splits) if not splits else list(splits)
    for split in splits:
        source.shards(split)  # raises naming the available splits
    tokens = tokens_description(model, tokenizer_dir)
    manifest = _output_manifest(out_dir, source, data_dir, tokens, list(model.feature_names) if with_reco else None)
    done = {s["path"] for shards in manifest.splits.values() for s in shards if (out_dir / s["path"]).exists()}
    todo = [(split, shard) for split in splits for shard in source.shards(split) if shard["path"] not in done]
    total = sum(shard["n_jets"] for _, shard in todo)

    from tqdm import tqdm

    bar = tqdm(total=total, unit="jet", unit_scale=True, desc="tokenize", disable=not progress, file=sys.stderr)
    started = time.perf_counter()
    try:
        for split, shard in todo:
            writer = ShardWriter(out_dir, shard["path"], source.particle_features, source.jet_features,
                                 len(source.classes), chunk_size=source.chunk_size, unit=shard.get("unit"))
            try:
                for jets in read_shard_chunks(data_dir, shard, source):
                    tokenized, _, _ = tokenize_jets(model, jets, source.particle_features, batch_size=batch_size,
                                                    device=device, with_reco=with_reco)
                    writer.write(tokenized)
                    bar.update(len(jets))
                record = writer.close()
            except BaseException:
                writer.abort()
                raise
            manifest.add_shard(split, record)
            manifest.save(out_dir)
    finally:
        bar.close()
    if not todo:
        manifest.save(out_dir)
    if progress:
        seconds = time.perf_counter() - started
        messages.info(f"tokenized {total} jets in {len(todo)} shards ({seconds:.1f} s, "
                      f"{total / max(seconds, 1e-9):.0f} jets/s); {len(done)} shards already done -> {out_dir}")
    return manifest


# ---------------------------------------------------------------------- command line
def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="directory of a trained tokenizer (save_tokenizer)")
    parser.add_argument("--data", required=True, help="input shard set (directory with manifest.json)")
    parser.add_argument("--out", required=True, help="output shard set (new directory; rerun to resume)")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: all in the manifest)")
    parser.add_argument("--batch-size", type=int, default=500, help="jets per encoder batch (default 500)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--with-reco", action="store_true",
                        help="also store the tokenizer-reconstructed features (physical units) as reco.npy")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_tokenize(args) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    try:
        manifest = tokenize_dataset(args.tokenizer, args.data, args.out, splits=splits, batch_size=args.batch_size,
                                    device=args.device, with_reco=args.with_reco, progress=not args.quiet)
    except (TokenizerMismatchError, FileNotFoundError) as error:
        messages.error(str(error))
        return 2
    counts = {split: manifest.n_jets(split) for split in manifest.splits}
    messages.output(f"{args.out}: tokens of a {manifest.tokens['codebook_size']}-code tokenizer; jets per split {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm data tokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenize_arguments(parser)
    try:
        return run_tokenize(parser.parse_args(argv))
    except DataError as error:
        messages.error(str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
