"""Writing shard sets: WebDataset tars of jet chunks plus the manifest that describes them.

Layout of a dataset directory:

    DIR/manifest.json
    DIR/train/shard-000000.tar   (entries <key>.part.npy, <key>.offsets.npy, ...: one key per chunk)
    DIR/val/...  DIR/test/...

Every tar is written to `<name>.tmp` and renamed when complete, and the manifest is rewritten
atomically after each finished shard, so an interrupted job leaves only whole shards behind
and a rerun can skip them (`Manifest.completed_shards`).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts.atomic import atomic_write_text
from .features import particle_features
from .format import (
    JET_FEATURES,
    KINEMATIC_FEATURES,
    SCHEMA_VERSION,
    UNITS,
    DataError,
    FeatureStats,
    JetArrays,
    encode_chunk,
    tar_chunk_spans,
)
from .remote import LocalStore, open_store

#: Features whose running statistics every manifest records (raw physical units).
STAT_PARTICLE_FEATURES = ("part_pt", "part_etarel", "part_phirel", "part_energy")
SPLITS = ("train", "val", "test")


@dataclass
class ShardRecord:
    """What the manifest knows about one finished shard."""

    path: str  # relative to the dataset directory
    n_jets: int
    n_chunks: int
    n_particles: int
    class_counts: list[int]
    particle_stats: dict
    jet_stats: dict
    unit: str | None = None  # generator work unit that produced it (for resume)
    chunks: list[list[int]] | None = None  # [offset, length] of every chunk's bytes (format.tar_chunk_spans)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Streams jets into one tar of fixed-size chunks; `close()` publishes it atomically.

    Memory holds at most one chunk of jets, whatever the number written.
    """

    def __init__(
        self,
        root: Path,
        relpath: str,
        particle_feature_names: list[str],
        jet_feature_names: list[str],
        n_classes: int,
        chunk_size: int = 1000,
        unit: str | None = None,
    ):
        self.root = Path(root)
        self.relpath = relpath
        self.path = self.root / relpath
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.particle_feature_names = list(particle_feature_names)
        self.jet_feature_names = list(jet_feature_names)
        self.n_classes = n_classes
        self.chunk_size = chunk_size
        self.unit = unit
        import webdataset as wds  # lazily: it imports torch, seconds per spawned generator worker

        self._stream = open(self.tmp_path, "wb")
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0.0)
        self._pending: list[JetArrays] = []
        self._pending_jets = 0
        self.n_jets = self.n_chunks = self.n_particles = 0
        self.class_counts = np.zeros(n_classes, np.int64)
        self.particle_stats = FeatureStats(list(STAT_PARTICLE_FEATURES))
        self.jet_stats = FeatureStats(list(self.jet_feature_names))

    def write(self, jets: JetArrays) -> None:
        if len(jets) == 0:
            return
        jets.check(
            f"{self.relpath} (jets being written)",
            len(self.particle_feature_names),
            len(self.jet_feature_names),
            self.n_classes,
        )
        self._pending.append(jets)
        self._pending_jets += len(jets)
        while self._pending_jets >= self.chunk_size:
            merged = JetArrays.concat(self._pending)
            head = merged.select(np.arange(self.chunk_size))
            rest = merged.select(np.arange(self.chunk_size, len(merged)))
            self._write_chunk(head)
            self._pending = [rest] if len(rest) else []
            self._pending_jets = len(rest)

    def _write_chunk(self, jets: JetArrays) -> None:
        entries = encode_chunk(jets)
        entries["__key__"] = f"chunk{self.n_chunks:06d}"
        self._tar.write(entries)
        self.n_chunks += 1
        self.n_jets += len(jets)
        self.n_particles += jets.n_particles
        self.class_counts += np.bincount(jets.label, minlength=self.n_classes)
        self.particle_stats.update(
            particle_features(jets.part, jets.offsets, self.particle_feature_names, STAT_PARTICLE_FEATURES)
        )
        self.jet_stats.update(jets.jet)

    def close(self) -> ShardRecord:
        if self._pending_jets:
            self._write_chunk(JetArrays.concat(self._pending))
            self._pending, self._pending_jets = [], 0
        self._tar.close()  # closes the underlying stream too
        os.replace(self.tmp_path, self.path)
        with tarfile.open(self.path, "r:") as tar:  # headers only: where each chunk's bytes lie
            spans = [[offset, length] for _, offset, length in tar_chunk_spans(tar)]
        return ShardRecord(
            path=self.relpath,
            n_jets=self.n_jets,
            n_chunks=self.n_chunks,
            n_particles=self.n_particles,
            class_counts=self.class_counts.tolist(),
            particle_stats=self.particle_stats.to_json(),
            jet_stats=self.jet_stats.to_json(),
            unit=self.unit,
            chunks=spans,
        )

    def abort(self) -> None:
        """Drop a partly written shard (used on errors and interrupts)."""
        try:
            self._tar.close()
        except Exception:
            pass
        self.tmp_path.unlink(missing_ok=True)


class ShardSetWriter:
    """Rolls a stream of jets into one split's shards of `jets_per_shard` jets each, numbered
    `<split>/shard-NNNNNN.tar` from `first_index`: the one way convert, generation and the sweep's
    training subsets write shard sets.

    save_each=True adds every finished shard to `manifest` and saves the manifest in `root` right
    away (a long job that is interrupted leaves whole, listed shards); save_each=False leaves the
    manifest alone and `records` to the caller, who lists them when the whole job succeeded (and
    `abort` removes every shard this writer made).
    """

    def __init__(self, root: Path, split: str, manifest: "Manifest", *, jets_per_shard: int,
                 first_index: int = 0, save_each: bool = False):
        if jets_per_shard < 1:
            raise ValueError(f"jets_per_shard must be >= 1, got {jets_per_shard}")
        self.root, self.split, self.manifest = Path(root), split, manifest
        self.jets_per_shard, self.index, self.save_each = jets_per_shard, first_index, save_each
        self.writer: ShardWriter | None = None
        self.in_shard = 0
        self.records: list[ShardRecord] = []
        self.written_paths: list[Path] = []

    def write(self, jets: JetArrays) -> None:
        done = 0
        while done < len(jets):
            if self.writer is None:
                self.writer = self._open_shard(f"{self.split}/shard-{self.index:06d}.tar")
                self.written_paths.append(self.writer.path)
                self.index += 1
                self.in_shard = 0
            take = min(len(jets) - done, self.jets_per_shard - self.in_shard)
            self.writer.write(jets if (done == 0 and take == len(jets)) else jets.select(np.arange(done, done + take)))
            self.in_shard += take
            done += take
            if self.in_shard >= self.jets_per_shard:
                self._close_shard()

    def _open_shard(self, relpath: str) -> ShardWriter:
        return ShardWriter(self.root, relpath, self.manifest.particle_features, self.manifest.jet_features,
                           len(self.manifest.classes), self.manifest.chunk_size)

    def _close_shard(self) -> None:
        record = self.writer.close()
        self.writer = None
        self.records.append(record)
        if self.save_each:
            self.manifest.add_shard(self.split, record)
            self.manifest.save(self.root)

    def finish(self) -> list[ShardRecord]:
        """Close the last (partly filled) shard; the records of every shard written."""
        if self.writer is not None:
            self._close_shard()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written; without save_each also every finished one."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if not self.save_each:
            for path in self.written_paths:
                path.unlink(missing_ok=True)


@dataclass
class Manifest:
    """manifest.json: the description of a shard set that every reader trusts and checks."""

    source: dict
    particle_features: list[str]
    jet_features: list[str]
    classes: list[str]
    max_particles: int = 128
    chunk_size: int = 1000
    splits: dict[str, list[dict]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    created_by: dict = field(default_factory=dict)
    tokens: dict | None = None  # tokenizer description when shards carry token ids
    reco_features: list[str] | None = None  # names of reco.npy columns (physical units)
    schema_version: int = SCHEMA_VERSION

    FILENAME = "manifest.json"

    # ------------------------------------------------------------------ build
    def __post_init__(self):
        if tuple(self.particle_features[:4]) != KINEMATIC_FEATURES:
            raise DataError(
                f"manifest particle_features must start with {list(KINEMATIC_FEATURES)}, got {self.particle_features[:4]}"
            )
        if tuple(self.jet_features[:6]) != JET_FEATURES:
            raise DataError(f"manifest jet_features must start with {list(JET_FEATURES)}, got {self.jet_features[:6]}")

    def add_shard(self, split: str, record: ShardRecord) -> None:
        shards = self.splits.setdefault(split, [])
        shards[:] = [s for s in shards if s["path"] != record.path]
        shards.append(record.to_json())
        shards.sort(key=lambda s: s["path"])

    def add_skipped(self, counts: dict[str, int]) -> None:
        for reason, count in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(count)

    def completed_units(self) -> set[str]:
        return {s["unit"] for shards in self.splits.values() for s in shards if s.get("unit")}

    # ------------------------------------------------------------------ summaries
    def shards(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise DataError(f"split {split!r} not in manifest; it has {sorted(self.splits)}")
        return self.splits[split]

    def n_jets(self, split: str) -> int:
        return sum(s["n_jets"] for s in self.shards(split))

    def class_counts(self, split: str) -> list[int]:
        total = np.zeros(len(self.classes), np.int64)
        for shard in self.shards(split):
            total += np.asarray(shard["class_counts"])
        return total.tolist()

    def particle_statistics(self, split: str = "train") -> dict:
        stats = FeatureStats(list(STAT_PARTICLE_FEATURES))
        for shard in self.shards(split):
            stats.merge(FeatureStats.from_json(shard["particle_stats"]))
        return stats.to_json()

    def jet_statistics(self, split: str = "train") -> dict:
        stats = FeatureStats(list(self.jet_features))
        for shard in self.shards(split):
            stats.merge(FeatureStats.from_json(shard["jet_stats"]))
        return stats.to_json()

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "format": "jetfm-chunked-webdataset",
            "source": self.source,
            "particle_features": self.particle_features,
            "jet_features": self.jet_features,
            "units": {name: UNITS.get(name, "") for name in self.particle_features + self.jet_features},
            "classes": self.classes,
            "max_particles": self.max_particles,
            "chunk_size": self.chunk_size,
            "counts": {
                split: {"n_jets": self.n_jets(split), "class_counts": self.class_counts(split)}
                for split in self.splits
            },
            "statistics": {
                split: {"particles": self.particle_statistics(split), "jets": self.jet_statistics(split)}
                for split in self.splits
            },
            "splits": self.splits,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "reco_features": self.reco_features,
            "created_by": self.created_by,
        }

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / self.FILENAME, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, directory) -> "Manifest":
        """The manifest of a shard set: a directory, a file:// URL, an http(s)/s3/gs URL or a ShardStore."""
        store = open_store(directory)
        path = store.where(cls.FILENAME)
        if isinstance(store, LocalStore) and not store.exists(cls.FILENAME):
            raise DataError(f"{path}: no manifest; expected a directory written by `jetfm data generate|convert`")
        try:
            data = json.loads(store.read_bytes(cls.FILENAME))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"{path}: schema_version {version!r}, this jetfm reads {SCHEMA_VERSION}")
        required = ("source", "particle_features", "jet_features", "classes", "splits")
        missing = [key for key in required if key not in data]
        if missing:
            raise DataError(f"{path}: missing keys {missing}")
        return cls(
            source=data["source"],
            particle_features=data["particle_features"],
            jet_features=data["jet_features"],
            classes=data["classes"],
            max_particles=data.get("max_particles", 128),
            chunk_size=data.get("chunk_size", 1000),
            splits=data["splits"],
            skipped=data.get("skipped", {}),
            created_by=data.get("created_by", {}),
            tokens=data.get("tokens"),
            reco_features=data.get("reco_features"),
        )

    def compatible_with(self, other: "Manifest", where: str) -> None:
        """Raise unless `other` describes the same kind of jets (for appending splits)."""
        for key in ("particle_features", "jet_features", "classes"):
            if getattr(self, key) != getattr(other, key):
                raise DataError(
                    f"{where}: {key} {getattr(other, key)} differ from the existing manifest's {getattr(self, key)}"
                )

    def verify(self, directory) -> None:
        """Check that every listed shard exists (`data.reader.verify_shards` also reads their counts)."""
        store = open_store(directory)
        for split, shards in self.splits.items():
            for shard in shards:
                if not store.exists(shard["path"]):
                    raise DataError(f"{store.where(shard['path'])}: listed in {store.where(self.FILENAME)} "
                                    f"(split {split}) but missing")


def creation_info() -> dict:
    from .. import __version__

    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "jetfm_version": __version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
