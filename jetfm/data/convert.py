"""Convert datasets users bring (JetClass ROOT, top-tagging HDF5) into jetfm shards.

    jetfm data convert jetclass 'JetClass/train_100M/*.root' --out data/jetclass --split train
    jetfm data convert jetclass 'JetClass/val_5M/*.root' --out data/jetclass --split val
    jetfm data convert toptag train.h5 --out data/toptag --split-fractions 0.8,0.1,0.1 --skip-bad

The output is the generator's format (docs/DATA.md): `DIR/{split}/shard-{k:06d}.tar`
of ~1,000-jet chunks plus `DIR/manifest.json`. Input is read in steps of `chunk_size` jets, so
memory stays bounded whatever the file size (the 1.2M-jet top-tagging train file is ~4 GB).

Per jet the converters store:
  JetClass  particles  part_px part_py part_pz part_energy [+ PID branches] [+ d0/dz branches]
            jet        jet_pt jet_eta jet_phi jet_energy (branches), jet_mass (from that
                       four-vector: JetClass has no jet_mass branch), jet_nparticles (branch)
                       [+ jet_sdmass jet_tau1..4]
            label      one-hot label_* branches -> index into JETCLASS_CLASSES
  top tag   particles  part_px part_py part_pz part_energy (columns PX_i PY_i PZ_i E_i, E == 0 is padding)
            jet        JET_FEATURES summed over all constituents, jet_nparticles before truncation
            label      is_signal_new -> TOPTAG_CLASSES
Particles are sorted by pT (descending) and truncated to `max_particles`.

Bad jets (NaN/inf, no particles, label not one-hot, particle branches of unequal length,
jet_nparticles disagreeing with the particles) raise DataError naming file and entry; with
`skip_bad` they are dropped and counted by reason in `manifest.skipped`.

A conversion is all-or-nothing: shards are published in the manifest when every input file
has been read; on an error in the data the shards this run wrote are removed and the directory
is as before. An *interrupted* conversion (SIGTERM, SIGINT, a killed job) keeps its finished
shards: `DIR/convert-progress.json` lists them with the command's settings, and rerunning the
same command continues — the input is read again (the split assignment and the shard boundaries
are a function of the whole stream), the finished shards are not rewritten, and the result is
the dataset an uninterrupted run writes. `--restart` discards the interrupted conversion instead.
Converting into a directory that already holds a compatible dataset appends to it (new shards
are numbered after the existing ones).

This module is the command, the shared conversion loop and the resumable writer with its
progress journal; the format readers are `convert_jetclass_root.JetClassFile` and
`convert_toptag_hdf5.TopTagFile`, and what they share (`Block`, the pT sort, split assignment,
file globs) is `convert_input`.

Files are read round-robin, `interleave` at a time in a seeded order, so that one shard mixes
jets of several input files (JetClass files hold one class each; a reader's shuffle buffer
then sees every class).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import messages
from ..artifacts.atomic import atomic_write_text
from .convert_input import Block, SplitAssigner, expand_files, parse_fractions
from .convert_jetclass_root import JetClassFile
from .convert_toptag_hdf5 import TopTagFile
from .format import JETCLASS_CLASSES, TOPTAG_CLASSES, DataError, JetArrays
from .shards import Manifest, ShardRecord, ShardSetWriter, ShardWriter, creation_info

#: Bad-jet reasons, in the order a jet is counted (each bad jet is counted once).
BAD_REASONS = {
    "shape": "particle arrays of unequal length",
    "nonfinite": "NaN or inf in a particle or jet feature",
    "empty": "jet has no particles",
    "label": "invalid label",
    "nparticles": "jet_nparticles disagrees with the number of particles",
}


# ----------------------------------------------------------------------------- output
def _next_shard_index(manifest: Manifest | None, split: str) -> int:
    if manifest is None:
        return 0
    indices = [
        int(m.group(1))
        for shard in manifest.splits.get(split, [])
        if (m := re.search(r"shard-(\d+)\.tar$", shard["path"]))
    ]
    return max(indices, default=-1) + 1


# ----------------------------------------------------------------------------- resuming
class ConvertProgress:
    """`DIR/convert-progress.json`: the settings of a conversion under way and its finished shards.

    Written atomically after every finished shard and removed once the manifest lists them, so a
    conversion stopped any way at all leaves whole shards that this file vouches for.
    """

    FILENAME = "convert-progress.json"

    def __init__(self, directory: Path, plan: dict, shards: dict[str, dict] | None = None):
        self.path = Path(directory) / self.FILENAME
        self.plan = plan
        self.shards = dict(shards or {})  # relpath -> ShardRecord json

    @classmethod
    def load(cls, directory: Path) -> "ConvertProgress | None":
        path = Path(directory) / cls.FILENAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(directory, data["plan"], data["shards"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{path}: unreadable record of an interrupted conversion ({error}); "
                            f"pass --restart to discard it") from error

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"plan": self.plan, "shards": self.shards}, indent=1))

    def finished(self, record: ShardRecord) -> None:
        self.shards[record.path] = record.to_json()
        self.save()

    def discard(self) -> None:
        """Remove the interrupted conversion's shards (finished and partial) and this record."""
        root = self.path.parent
        for relpath in self.shards:
            (root / relpath).unlink(missing_ok=True)
        for split in self.plan.get("first_index", {}):
            for tmp in (root / split).glob("shard-*.tar.tmp"):
                tmp.unlink()
        self.path.unlink(missing_ok=True)


class _FinishedShard:
    """Stands in for a ShardWriter of a shard an interrupted run already wrote: takes its jets
    (so the following shards start where they did), writes nothing, returns the stored record."""

    def __init__(self, root: Path, relpath: str, record: dict):
        self.path = Path(root) / relpath
        self.relpath = relpath
        self.record = record
        self.n_jets = 0
        if not self.path.exists():
            raise DataError(f"{self.path}: listed as finished in {Path(root) / ConvertProgress.FILENAME} but missing; "
                            f"pass --restart to convert from scratch")

    def write(self, jets: JetArrays) -> None:
        self.n_jets += len(jets)

    def close(self) -> ShardRecord:
        if self.n_jets != self.record["n_jets"]:
            raise DataError(f"{self.path}: the interrupted conversion wrote {self.record['n_jets']} jets here, this "
                            f"run routes {self.n_jets}; the input files changed — pass --restart")
        return ShardRecord(**self.record)

    def abort(self) -> None:
        pass


class _ResumableShardSetWriter(ShardSetWriter):
    """A ShardSetWriter that skips shards `journal` lists and records each one it finishes."""

    def __init__(self, *args, journal: ConvertProgress, **kwargs):
        super().__init__(*args, **kwargs)
        self.journal = journal

    def _open_shard(self, relpath: str) -> ShardWriter | _FinishedShard:
        if relpath in self.journal.shards:
            return _FinishedShard(self.root, relpath, self.journal.shards[relpath])
        return super()._open_shard(relpath)

    def _close_shard(self) -> None:
        super()._close_shard()
        self.journal.finished(self.records[-1])

    def interrupt(self) -> None:
        """Drop only the shard being written: the finished ones stay for a rerun."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ----------------------------------------------------------------------------- driver
def _convert(
    kind: str,
    opener,
    classes: tuple[str, ...],
    files,
    out_dir,
    *,
    split: str | None,
    split_fractions,
    max_particles: int,
    chunk_size: int,
    jets_per_shard: int,
    skip_bad: bool,
    seed: int,
    progress: bool,
    interleave: int,
    source_extra: dict,
    restart: bool = False,
) -> Manifest:
    fractions = parse_fractions(split_fractions)
    if fractions is not None and split not in (None, "train"):
        raise ValueError(f"give either split ({split!r}) or split_fractions ({split_fractions!r}), not both")
    if fractions is None:
        split = split or "train"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
            raise ValueError(f"split name {split!r}: use letters, digits, '_', '-' or '.'")
    if max_particles < 1 or chunk_size < 1 or jets_per_shard < 1 or interleave < 1:
        raise ValueError("max_particles, chunk_size, jets_per_shard and interleave must be positive")
    paths = expand_files(files)
    out_dir = Path(out_dir)

    # Open every file first: a missing branch or column fails before anything is written.
    sources = []
    try:
        schemas = []
        checking = paths if not progress or len(paths) < 20 else _progress_files(paths)
        for path in checking:
            source = opener(path)
            sources.append(source)
            schemas.append(source.schema())
        total = sum(source.n_entries for source in sources)
        particle_features = [n for n in schemas[0][0] if all(n in s[0] for s in schemas)]
        jet_features = [n for n in schemas[0][1] if all(n in s[1] for s in schemas)]
        dropped = sorted({n for s in schemas for n in s[0] + s[1]} - set(particle_features + jet_features))
        if dropped:
            messages.warn(f"{dropped} are missing in some input files; not stored")
        for source in sources:
            source.configure(particle_features, jet_features, max_particles)
    finally:
        for source in sources:
            source.close()

    settings = {
        "split": split if fractions is None else None,
        "split_fractions": list(fractions) if fractions else None,
        "seed": seed,
        "skip_bad": skip_bad,
    }
    manifest = Manifest(
        source={"kind": kind, "files": paths, **source_extra, "conversions": []},
        particle_features=particle_features,
        jet_features=jet_features,
        classes=list(classes),
        max_particles=max_particles,
        chunk_size=chunk_size,
    )
    journal = ConvertProgress.load(out_dir)
    if journal is not None and restart:
        messages.info(f"{out_dir}: discarding the interrupted conversion's {len(journal.shards)} finished shard(s)")
        journal.discard()
        journal = None
    existing = None
    if (out_dir / Manifest.FILENAME).exists():
        existing = Manifest.load(out_dir)
        where = f"{out_dir / Manifest.FILENAME}"
        if existing.source.get("kind") != kind:
            raise DataError(f"{where}: holds {existing.source.get('kind')!r} jets; cannot append {kind!r} jets")
        existing.compatible_with(manifest, where)
        if existing.max_particles != max_particles:
            raise DataError(f"{where}: max_particles {existing.max_particles}, this conversion uses {max_particles}")
        again = sorted(set(paths) & set(existing.source.get("files", [])))
        if again and journal is not None and set(journal.plan["files"]) <= set(existing.source.get("files", [])):
            journal.path.unlink()  # stopped after publishing the manifest: that conversion is complete
            journal = None
        if again:
            raise DataError(f"{where}: already holds jets converted from {again}; convert into a fresh --out")
        if existing.chunk_size != chunk_size:
            messages.info(f"note: appending with the existing chunk size {existing.chunk_size}, not {chunk_size}")
        manifest = existing
        manifest.source["files"] = list(manifest.source.get("files", [])) + paths
        manifest.source.setdefault("conversions", [])
    elif journal is None and any(out_dir.glob("*/shard-*.tar")):
        raise DataError(f"{out_dir}: holds shards but no {Manifest.FILENAME} (nor a {ConvertProgress.FILENAME} of "
                        f"an interrupted conversion to continue); convert into an empty directory")

    assigner = SplitAssigner(split, fractions, seed)
    plan = {
        "kind": kind,
        "files": paths,
        **settings,
        **source_extra,
        "max_particles": max_particles,
        "chunk_size": manifest.chunk_size,
        "jets_per_shard": jets_per_shard,
        "interleave": interleave,
        "first_index": {name: _next_shard_index(existing, name) for name in assigner.names},
    }
    if journal is None:
        journal = ConvertProgress(out_dir, plan)
        out_dir.mkdir(parents=True, exist_ok=True)
        journal.save()
    elif journal.plan != plan:
        differ = sorted(k for k in set(plan) | set(journal.plan) if plan.get(k) != journal.plan.get(k))
        raise DataError(
            f"{journal.path}: an interrupted conversion is under way in {out_dir} with other settings "
            f"(differing: {differ}); rerun its command to continue it, or pass --restart to discard "
            f"its {len(journal.shards)} finished shard(s)"
        )
    else:
        for name in assigner.names:  # the shard that was being written when it stopped
            for tmp in (out_dir / name).glob("shard-*.tar.tmp"):
                tmp.unlink()
        if journal.shards and progress:
            messages.info(f"continuing the interrupted conversion in {out_dir}: {len(journal.shards)} finished "
                          f"shard(s) are kept, the input is read again to find where it stopped")
    outputs = [
        _ResumableShardSetWriter(out_dir, name, manifest, jets_per_shard=jets_per_shard,
                                 first_index=plan["first_index"][name], journal=journal)
        for name in assigner.names
    ]
    # Seeded file order, then round-robin over a window of `interleave` open files.
    order = np.random.default_rng(seed).permutation(len(paths)) if interleave > 1 else np.arange(len(paths))
    pending = [paths[i] for i in order]
    skipped = {reason: 0 for reason in BAD_REASONS}
    n_read = n_written = 0
    bar = _progress_bar(progress, kind, total)
    started = time.perf_counter()
    active: list[tuple] = []  # (source, block iterator, split rng)
    try:
        while pending or active:
            while pending and len(active) < interleave:
                source = opener(pending.pop(0))
                source.schema()
                source.configure(particle_features, jet_features, max_particles)
                active.append((source, source.blocks(chunk_size), assigner.stream(source.path)))
            for slot in list(active):
                source, blocks, rng = slot
                block = next(blocks, None)
                if block is None:
                    source.close()
                    active.remove(slot)
                    continue
                assignment = assigner.assign(rng, len(block.jets))
                n_good = _emit(block, source.path, kind, assignment, outputs, skipped, skip_bad)
                n_read += len(block.jets)
                n_written += n_good
                bar.update(len(block.jets))
                if n_read > n_written:
                    bar.set_postfix(skipped=n_read - n_written, refresh=False)
        for output in outputs:
            output.finish()
    except (KeyboardInterrupt, SystemExit):  # stopped, not failed: keep the finished shards
        for source, _, _ in active:
            source.close()
        for output in outputs:
            output.interrupt()
        bar.close()
        raise
    except BaseException:
        for source, _, _ in active:
            source.close()
        for output in outputs:
            output.abort()
        journal.path.unlink(missing_ok=True)
        bar.close()
        raise
    bar.close()
    elapsed = time.perf_counter() - started

    for output in outputs:
        for record in output.records:
            manifest.add_shard(output.split, record)
    manifest.add_skipped({k: v for k, v in skipped.items() if v})
    manifest.created_by = creation_info()
    manifest.source["conversions"].append(
        {
            "files": paths,
            **settings,
            "n_read": n_read,
            "n_jets": n_written,
            "skipped": {k: v for k, v in skipped.items() if v},
            "shards": [r.path for o in outputs for r in o.records],
            "created_by": manifest.created_by,
        }
    )
    manifest.save(out_dir)
    journal.path.unlink(missing_ok=True)
    rate = n_read / max(elapsed, 1e-9)
    if progress:
        n_shards = sum(len(o.records) for o in outputs)
        messages.info(
            f"converted {n_written:,} jets ({n_read - n_written:,} skipped) from {len(paths)} {kind} files "
            f"into {n_shards} shards in {out_dir} ({rate:,.0f} jets/s)"
        )
    return manifest


def _emit(block: Block, path: str, kind: str, assignment: np.ndarray, outputs, skipped: dict, skip_bad: bool) -> int:
    """Validate one block, drop or refuse bad jets, write the rest to their splits. Returns jets written."""
    n = len(block.jets)
    reasons = [(r, block.bad[r]) for r in BAD_REASONS if r in block.bad and block.bad[r].any()]
    bad = np.zeros(n, bool)
    for _, mask in reasons:
        bad |= mask
    if bad.any() and not skip_bad:
        i = int(np.argmax(bad))  # the first bad entry, under its first reason
        reason = next(r for r, mask in reasons if mask[i])
        what = "row" if kind == "toptag" else "entry"
        detail = block.detail(reason, i)
        raise DataError(
            f"{path}: {what} {block.start + i}: {BAD_REASONS[reason]}"
            + (f" ({detail})" if detail else "")
            + "; fix the input or pass --skip-bad to drop such jets (they are counted in the manifest)"
        )
    counted = np.zeros(n, bool)
    for reason, mask in reasons:  # each bad jet counted once, under its first reason
        skipped[reason] += int((mask & ~counted).sum())
        counted |= mask
    if len(outputs) == 1:
        jets = block.jets if not bad.any() else block.jets.select(np.flatnonzero(~bad))
        outputs[0].write(jets)
        return len(jets)
    written = 0
    for k, output in enumerate(outputs):
        index = np.flatnonzero((assignment == k) & ~bad)
        if len(index):
            output.write(block.jets.select(index))
            written += len(index)
    return written


def _progress_files(paths: list[str]):
    from tqdm import tqdm

    return tqdm(paths, desc="check inputs", unit=" files")


def _progress_bar(enabled: bool, kind: str, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"convert {kind}", unit=" jets", unit_scale=True, disable=not enabled, smoothing=0.1
    )


# ----------------------------------------------------------------------------- public API
def convert_jetclass(
    files: list[str] | str,
    out_dir,
    *,
    split: str | None = "train",
    split_fractions=None,
    max_particles: int = 128,
    chunk_size: int = 1000,
    jets_per_shard: int = 100_000,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool = True,
    interleave: int = 16,
    tree: str = "tree",
    restart: bool = False,
) -> Manifest:
    """Convert JetClass ROOT files (paths or globs) into shards under `out_dir`; returns the manifest.

    `split` puts every jet into that split; `split_fractions` (train, val, test), e.g. "0.8,0.1,0.1",
    spreads jets over the three splits, seeded by `seed`. See the module docstring for the features.
    An interrupted conversion into `out_dir` is continued when the settings match; `restart=True`
    discards it first.
    """
    return _convert(
        "jetclass",
        lambda path: JetClassFile(path, tree),
        JETCLASS_CLASSES,
        files,
        out_dir,
        split=split,
        split_fractions=split_fractions,
        max_particles=max_particles,
        chunk_size=chunk_size,
        jets_per_shard=jets_per_shard,
        skip_bad=skip_bad,
        seed=seed,
        progress=progress,
        interleave=interleave,
        source_extra={"tree": tree},
        restart=restart,
    )


def convert_toptag(
    files: list[str] | str,
    out_dir,
    *,
    split: str | None = "train",
    split_fractions=None,
    max_particles: int = 128,
    chunk_size: int = 1000,
    jets_per_shard: int = 100_000,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool = True,
    interleave: int = 16,
    key: str = "table",
    allow_pickle: bool = False,
    restart: bool = False,
) -> Manifest:
    """Convert top-tagging pandas HDF5 files (fixed or table format) into shards; see convert_jetclass.

    `allow_pickle` reads table-format files through pandas/PyTables, which unpickles attributes of
    the file (runs code a hostile file carries): only for trusted files the safe reader refuses.
    """
    return _convert(
        "toptag",
        lambda path: TopTagFile(path, key, allow_pickle),
        TOPTAG_CLASSES,
        files,
        out_dir,
        split=split,
        split_fractions=split_fractions,
        max_particles=max_particles,
        chunk_size=chunk_size,
        jets_per_shard=jets_per_shard,
        skip_bad=skip_bad,
        seed=seed,
        progress=progress,
        interleave=interleave,
        source_extra={"key": key},
        restart=restart,
    )


CONVERTERS = {"jetclass": convert_jetclass, "toptag": convert_toptag}


# ----------------------------------------------------------------------------- command line
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `jetfm data convert {jetclass,toptag} FILES... --out DIR`."""
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="input layout: JetClass ROOT or top-tagging HDF5")
    parser.add_argument("files", nargs="+", help="input files or quoted globs ('JetClass/train/*.root')")
    parser.add_argument("--out", required=True, help="output dataset directory (appended to if it holds a dataset)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", default=None, help="put every jet into this split (default: train)")
    where.add_argument(
        "--split-fractions", default=None, metavar="TRAIN,VAL,TEST",
        help="spread jets over train/val/test with these fractions, e.g. 0.8,0.1,0.1 (seeded)",
    )
    parser.add_argument("--max-particles", type=int, default=128, help="keep the hardest N particles per jet")
    parser.add_argument("--chunk-size", type=int, default=1000, help="jets per tar entry (chunk)")
    parser.add_argument("--jets-per-shard", type=int, default=100_000, help="jets per shard file")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop bad jets (counted in the manifest) instead of failing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment and the file order")
    parser.add_argument("--interleave", type=int, default=16,
                        help="files read round-robin at a time (1: one after another)")
    parser.add_argument("--tree", default="tree", help="JetClass: TTree name")
    parser.add_argument("--key", default="table", help="top tagging: pandas HDF5 key")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="top tagging: read table-format files through pandas/PyTables, which unpickles "
                             "attributes of the file and so runs any code it carries; only for trusted files "
                             "that the safe reader refuses")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--restart", action="store_true",
                        help="discard an interrupted conversion in --out instead of continuing it")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `jetfm data convert`; returns 0, or 2 on inconsistent arguments. Bad input raises DataError."""
    extra = {"tree": args.tree} if args.kind == "jetclass" else {"key": args.key, "allow_pickle": args.allow_pickle}
    try:
        CONVERTERS[args.kind](
            args.files,
            args.out,
            split=None if args.split_fractions else (args.split or "train"),
            split_fractions=args.split_fractions,
            max_particles=args.max_particles,
            chunk_size=args.chunk_size,
            jets_per_shard=args.jets_per_shard,
            skip_bad=args.skip_bad,
            seed=args.seed,
            progress=not args.no_progress,
            interleave=args.interleave,
            restart=args.restart,
            **extra,
        )
    except KeyboardInterrupt:
        messages.info(f"interrupted; finished shards are kept — rerun the same command to continue {args.out}")
        return 130
    except DataError:
        raise  # the jetfm command prints it and exits with 2
    except ValueError as error:  # inconsistent arguments
        messages.error(str(error))
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm data convert", description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    try:
        return run_convert(parser.parse_args(argv))
    except DataError as error:
        messages.error(str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
