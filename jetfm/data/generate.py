"""`jetfm data generate`: the embedded default data source — Pythia 8 jets written as shards.

    jetfm data generate data/toptag --preset toptag --train 100000 --val 20000 --test 20000 --workers 8
    jetfm data generate data/jc --preset jetclass --train 1000 --set mpi=off --set "pythia=PartonLevel:ISR = off"

Per event: Pythia 8 (`pythia8mc`) generates the process of the class, the visible final-state
particles (isFinal and isVisible) are clustered with anti-kT R=0.8 (FastJet), jets in the
(pT, |eta|) window are kept — signal classes only when truth-matched to their decay
(presets.py) — and each jet is stored raw: constituents pT-descending, at most
`max_particles`, particle features KINEMATIC_FEATURES + PID_FEATURES, jet features
JET_FEATURES computed from ALL constituents (jet_nparticles is the full count).

Work is cut into units: unit k of a split makes `jets_per_shard` jets of every class from
its own seeds (derived from seed, split, k and the class), shuffles them and writes
`{split}/shard-{k:06d}.tar`. Units run in a pool of `workers` processes; the manifest is
saved after every finished unit, so rerunning the same command continues an interrupted
run and yields exactly the dataset an uninterrupted run writes.

Speed: events come from `Pythia.nextBatch` as columnar (awkward) arrays and are clustered
per batch through FastJet's multi-event interface, so no Python code runs per particle or
per event except the truth matching of events that have a jet in the window. Pythia takes
~65-70% of the time (MPI off; ~75% with MPI), FastJet ~15%, the rest ~10%. Measured on
the 2-core dev machine, per core: toptag 80-100 jets/s; jetclass ~90 jets/s with MPI off
and ~30 jets/s with MPI on (its default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import queue as queue_module
import signal
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .. import messages
from .format import JET_FEATURES, KINEMATIC_FEATURES, PID_FEATURES, DataError, JetArrays
from .physics import delta_r, jets_from_constituents, pt_eta_phi
from .presets import (
    OVERRIDE_HELP,
    PRESETS,
    PROCESSES,
    RESONANCES,
    GeneratorSettings,
    Process,
    apply_overrides,
    decay_matches,
    get_preset,
    parse_assignments,
)
from .shards import Manifest, ShardWriter, creation_info

PARTICLE_FEATURES = KINEMATIC_FEATURES + PID_FEATURES
DEFAULT_JETS_PER_CLASS = {"train": 1000, "val": 200, "test": 200}
#: Pythia accepts Random:seed in [1, 900000000).
_MAX_PYTHIA_SEED = 900_000_000
#: Give up on a class after this many events without a single jet.
_MAX_EVENTS_WITHOUT_JETS = 2000


# ============================================================================ seeds and units
def derived_seed(seed: int, split: str, unit: int, stream: int) -> int:
    """A Pythia seed in [1, 9e8) for (seed, split, unit, stream); stream = class index, or -1."""
    key = (zlib.crc32(split.encode()), unit, stream + 1)
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return 1 + int(state % np.uint64(_MAX_PYTHIA_SEED - 1))


@dataclass(frozen=True)
class Unit:
    """One shard: `n_per_class` jets of every class of one split."""

    split: str
    index: int
    n_per_class: int

    @property
    def relpath(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def unit_id(self) -> str:
        return f"{self.split}/{self.index:06d}"


def plan_units(jets_per_class: Mapping[str, int], jets_per_shard: int | None) -> list[Unit]:
    units = []
    for split, n in jets_per_class.items():
        if n < 0:
            raise DataError(f"jets per class for split {split!r} must be >= 0, got {n}")
        per_shard = jets_per_shard or min(1000, n)
        if per_shard < 1:
            raise DataError(f"jets_per_shard must be >= 1, got {jets_per_shard}")
        for k, start in enumerate(range(0, n, per_shard)):
            units.append(Unit(split, k, min(per_shard, n - start)))
    return units


# ============================================================================ one event batch
class ParticleTable:
    """isVisible / charge / isHadron by PDG id, looked up once per id from Pythia's tables."""

    def __init__(self, particle_data):
        self._data = particle_data
        self._cache: dict[int, tuple[bool, float, bool]] = {}

    def lookup(self, pid: np.ndarray):
        unique, inverse = np.unique(pid, return_inverse=True)
        rows = []
        for value in unique.tolist():
            if value not in self._cache:
                d = self._data
                self._cache[value] = (bool(d.isVisible(value)), float(d.charge(value)), bool(d.isHadron(value)))
            rows.append(self._cache[value])
        table = np.array(rows, dtype=np.float64).reshape(-1, 3)[inverse]
        return table[:, 0] > 0, table[:, 1], table[:, 2] > 0


def _ragged_positions(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges [starts[i], starts[i] + counts[i])."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return base + np.arange(total)


class _EventRecord:
    """Flat numpy view of one event of the batch (local indices as in Pythia's record)."""

    def __init__(self, pid, mother1, daughter1, daughter2):
        self.pid, self.mother1, self.daughter1, self.daughter2 = pid, mother1, daughter1, daughter2

    def daughters(self, i: int) -> list[int]:
        d1, d2 = int(self.daughter1[i]), int(self.daughter2[i])
        if d1 <= 0:
            return []
        if d2 <= 0 or d2 == d1:
            return [d1]
        if d2 > d1:
            return list(range(d1, d2 + 1))
        return [d1, d2]

    def bottom_copy(self, i: int) -> int:
        """Follow a resonance through its recoil copies (and W -> W gamma) to where it decays."""
        while True:
            same = [d for d in self.daughters(i) if self.pid[d] == self.pid[i]]
            if len(same) != 1:
                return i
            i = same[0]

    def decay_products(self, i: int, depth: int = 0) -> list[int]:
        """Non-resonant decay products of resonance i, through intermediate resonances."""
        out = []
        for d in self.daughters(self.bottom_copy(i)):
            if abs(int(self.pid[d])) in RESONANCES and depth < 4:
                out += self.decay_products(d, depth + 1)
            else:
                out.append(d)
        return out

    def matched_decays(self, resonance: int, pattern: str) -> list[list[int]]:
        """For every resonance (first copy) with |id| == resonance decaying as `pattern`:
        the indices of its visible decay products (neutrinos excluded)."""
        out = []
        for i in np.flatnonzero(np.abs(self.pid) == resonance).tolist():
            if self.pid[self.mother1[i]] == self.pid[i]:
                continue  # a copy; its first copy is handled
            products = self.decay_products(i)
            if decay_matches(self.pid[products], pattern):
                out.append([d for d in products if abs(int(self.pid[d])) not in (12, 14, 16)])
        return out


def jets_from_events(
    batch,
    settings: GeneratorSettings,
    process: Process,
    label: int,
    table: ParticleTable,
    jet_definition,
) -> JetArrays:
    """Jets of one class from a `Pythia.nextBatch` result, in event order (pT-descending
    within an event). Legend: N particles of the batch, J jets, T kept constituents."""
    import awkward as ak
    import fastjet

    prt = batch["prt"]
    n_events = len(prt)
    counts = ak.to_numpy(ak.num(prt)).astype(np.int64)
    if n_events == 0:
        return JetArrays.empty(len(PARTICLE_FEATURES), len(JET_FEATURES))
    starts = np.concatenate([[0], np.cumsum(counts)])
    flat = ak.flatten(prt)
    pid_N = ak.to_numpy(flat["id"]).astype(np.int64)
    status_N = ak.to_numpy(flat["status"])
    momentum = flat["p"]
    p4_N4 = np.stack([ak.to_numpy(momentum[k]).astype(np.float64) for k in ("px", "py", "pz", "e")], axis=1)

    # --- cluster the visible final state of all events at once
    rows = np.flatnonzero(status_N > 0)
    rows = rows[table.lookup(pid_N[rows])[0]]
    event_of_row = np.repeat(np.arange(n_events), counts)[rows]
    kept_counts = np.bincount(event_of_row, minlength=n_events)
    kept_starts = np.concatenate([[0], np.cumsum(kept_counts)])
    particles = ak.unflatten(
        ak.zip({name: p4_N4[rows, k] for k, name in enumerate(("px", "py", "pz", "E"))}), kept_counts
    )
    sequence = fastjet.ClusterSequence(particles, jet_definition)
    jets = sequence.inclusive_jets(min_pt=settings.pt_min)
    constituents = sequence.constituent_index(min_pt=settings.pt_min)

    jet_counts = ak.to_numpy(ak.num(jets)).astype(np.int64)
    jets_flat = ak.flatten(jets)
    jpx, jpy, jpz = (ak.to_numpy(jets_flat[k]) for k in ("px", "py", "pz"))
    jet_pt, jet_eta, jet_phi = pt_eta_phi(jpx, jpy, jpz)
    jet_event = np.repeat(np.arange(n_events), jet_counts)
    n_const_J = ak.to_numpy(ak.flatten(ak.num(constituents, axis=2))).astype(np.int64)
    const_local = ak.to_numpy(ak.flatten(constituents, axis=None)).astype(np.int64)
    const_starts = np.concatenate([[0], np.cumsum(n_const_J)])
    # local index (into the event's kept particles) -> row in the flat batch arrays
    const_rows = rows[kept_starts[np.repeat(jet_event, n_const_J)] + const_local]

    keep_J = (jet_pt > settings.pt_min) & (jet_pt < settings.pt_max) & (np.abs(jet_eta) < settings.eta_max)
    if process.resonance is not None and keep_J.any():
        matched = np.zeros_like(keep_J)
        mother1_N, daughter1_N, daughter2_N = (ak.to_numpy(flat[k]) for k in ("mother1", "daughter1", "daughter2"))
        for event in np.unique(jet_event[keep_J]).tolist():
            a, b = starts[event], starts[event + 1]
            record = _EventRecord(pid_N[a:b], mother1_N[a:b], daughter1_N[a:b], daughter2_N[a:b])
            decays = record.matched_decays(process.resonance, process.decay)
            if not decays:
                continue
            for j in np.flatnonzero(keep_J & (jet_event == event)).tolist():
                for products in decays:
                    _, eta, phi = pt_eta_phi(*(p4_N4[a + np.asarray(products), k] for k in range(3)))
                    if np.all(delta_r(jet_eta[j], jet_phi[j], eta, phi) < settings.match_radius):
                        matched[j] = True
                        break
        keep_J &= matched

    selected = np.flatnonzero(keep_J)
    selected = selected[np.lexsort((-jet_pt[selected], jet_event[selected]))]
    if len(selected) == 0:
        return JetArrays.empty(len(PARTICLE_FEATURES), len(JET_FEATURES))

    # --- constituents of the selected jets: jet features from all, keep the hardest
    n_full = n_const_J[selected]
    full_offsets = np.concatenate([[0], np.cumsum(n_full)])
    full_rows = const_rows[_ragged_positions(const_starts[selected], n_full)]
    p4_T4 = p4_N4[full_rows]
    jet = jets_from_constituents(p4_T4, full_offsets)
    jet_index = np.repeat(np.arange(len(selected)), n_full)
    order = np.lexsort((-np.hypot(p4_T4[:, 0], p4_T4[:, 1]), jet_index))
    rank = np.arange(len(order)) - np.repeat(full_offsets[:-1], n_full)
    kept = order[rank < settings.max_particles]
    n_kept = np.minimum(n_full, settings.max_particles)

    part_rows = full_rows[kept]
    pid = pid_N[part_rows]
    _, charge, hadron = table.lookup(pid)
    part = np.column_stack([
        p4_N4[part_rows],
        charge,
        hadron & (charge != 0),
        hadron & (charge == 0),
        pid == 22,
        np.abs(pid) == 11,
        np.abs(pid) == 13,
    ]).astype(np.float32)
    return JetArrays(
        part=part,
        offsets=np.concatenate([[0], np.cumsum(n_kept)]).astype(np.int64),
        jet=np.column_stack([jet[name] for name in JET_FEATURES]).astype(np.float32),
        label=np.full(len(selected), label, np.int64),
    )


# ============================================================================ one class, one unit
def make_pythia(settings: GeneratorSettings, name: str, seed: int):
    import pythia8mc

    pythia = pythia8mc.Pythia("", False)
    for line in settings.pythia_lines(name) + ["Random:setSeed = on", f"Random:seed = {seed}"]:
        if not pythia.readString(line):
            raise DataError(f"Pythia rejected the setting {line!r} (class {name}); see Pythia's message above")
    if not pythia.init():
        raise DataError(f"Pythia failed to initialise for class {name} with {settings.pythia_lines(name)}")
    return pythia


def _jet_definition(settings: GeneratorSettings):
    import fastjet

    try:  # FastJet's banner (a citation request, honoured in the manifest's source) would break the progress bar
        import fastjet._swig

        fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)
    except (ImportError, AttributeError):
        pass
    return fastjet.JetDefinition(fastjet.antikt_algorithm, settings.jet_radius)


def generate_class_jets(
    settings: GeneratorSettings,
    class_index: int,
    n_jets: int,
    seed: int,
    report: Callable[[int], None] | None = None,
) -> tuple[JetArrays, int]:
    """The first `n_jets` jets of class `class_index` from a Pythia seeded with `seed`,
    and the number of events generated. Batch sizes do not change which jets come out."""
    name = settings.classes[class_index]
    process = settings.process(name)
    pythia = make_pythia(settings, name, seed)
    table = ParticleTable(pythia.particleData)
    jet_definition = _jet_definition(settings)
    parts: list[JetArrays] = []
    n_have = n_events = 0
    batch_size = 16
    while n_have < n_jets:
        batch = pythia.nextBatch(batch_size)
        n_events += len(batch)
        jets = jets_from_events(batch, settings, process, class_index, table, jet_definition)
        take = min(len(jets), n_jets - n_have)
        if take:
            parts.append(jets if take == len(jets) else jets.select(np.arange(take)))
            n_have += take
            if report:
                report(take)
        if n_have == 0 and n_events >= _MAX_EVENTS_WITHOUT_JETS:
            raise DataError(
                f"class {name}: no jet in the window (pT {settings.pt_min}-{settings.pt_max} GeV, |eta| < "
                f"{settings.eta_max}) after {n_events} events with pTHatMin {settings.pthat} GeV; check the settings"
            )
        # aim at the remaining jets with ~10% margin, from the efficiency so far
        efficiency = max(n_have / max(n_events, 1), 0.02)
        batch_size = int(np.clip(np.ceil((n_jets - n_have) / efficiency * 1.1), 8, 256))
    return JetArrays.concat(parts) if parts else JetArrays.empty(len(PARTICLE_FEATURES), len(JET_FEATURES)), n_events


@dataclass(frozen=True)
class UnitTask:
    out_dir: str
    unit: Unit
    settings: GeneratorSettings
    seed: int
    chunk_size: int


def run_unit(task: UnitTask, report: Callable[[int], None] | None = None) -> dict:
    """Generate every class of one unit, shuffle, write the shard; return {"split", "record": ShardRecord}."""
    settings, unit = task.settings, task.unit
    per_class = []
    for c in range(len(settings.classes)):
        seed = derived_seed(task.seed, unit.split, unit.index, c)
        per_class.append(generate_class_jets(settings, c, unit.n_per_class, seed, report)[0])
    jets = JetArrays.concat(per_class)
    shuffle = np.random.default_rng(derived_seed(task.seed, unit.split, unit.index, -1))
    jets = jets.select(shuffle.permutation(len(jets)))
    writer = ShardWriter(
        Path(task.out_dir), unit.relpath, list(PARTICLE_FEATURES), list(JET_FEATURES),
        len(settings.classes), chunk_size=task.chunk_size, unit=unit.unit_id,
    )
    try:
        writer.write(jets)
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"split": unit.split, "record": record}


def _worker_loop(tasks, results) -> None:
    """A generator process: run units from `tasks` until the None sentinel, reporting
    ("progress", n_jets), ("done", result) or ("error", exception, traceback) on `results`."""
    # Ctrl-C reaches the whole process group: only the main process handles it (and
    # terminates the workers); finished units are already in the manifest
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (task := tasks.get()) is not None:
        try:
            results.put(("done", run_unit(task, lambda n: results.put(("progress", n)))))
        except BaseException as error:  # noqa: BLE001 — handed to the main process
            try:
                pickle.dumps(error)
            except Exception:
                error = DataError(f"{type(error).__name__}: {error}")
            results.put(("error", error, f"unit {task.unit.unit_id}:\n{traceback.format_exc()}"))
            return


# ============================================================================ the dataset
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("pythia8mc", "fastjet"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def _normalised(value):
    return json.loads(json.dumps(value))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: existing {a!r}, requested {b!r}")
    return out


def resolve_settings(preset: str, overrides: dict | None) -> GeneratorSettings:
    return apply_overrides(get_preset(preset), overrides)


def generate_dataset(
    out_dir,
    preset: str = "toptag",
    jets_per_class: Mapping[str, int] = DEFAULT_JETS_PER_CLASS,
    *,
    workers: int = 1,
    seed: int = 0,
    jets_per_shard: int | None = None,
    chunk_size: int = 1000,
    overrides: dict | None = None,
    progress: bool = True,
) -> Manifest:
    """Generate (or continue generating) a Pythia 8 jet dataset in `out_dir`; return its manifest.

    jets_per_class: split -> jets per class (the split holds that many jets of every class).
    jets_per_shard: jets per class in one unit/shard; default min(1000, jets of the split).
    overrides: GeneratorSettings fields to change (presets.OVERRIDE_KEYS).
    Rerunning with identical arguments skips finished units; different arguments raise.
    """
    from tqdm.auto import tqdm

    settings = resolve_settings(preset, overrides)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise DataError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= seed < 2**63:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    jets_per_class = {split: int(n) for split, n in jets_per_class.items()}
    units = plan_units(jets_per_class, jets_per_shard)
    out_dir = Path(out_dir)

    source = _normalised({
        "kind": "pythia8",
        "generator": "jetfm.data.generate (Pythia 8 + FastJet anti-kT; please cite both)",
        "versions": _versions(),
        "preset": preset,
        "settings": settings.to_json(),
        "seed": seed,
        "jets_per_class": jets_per_class,
        "jets_per_shard": {split: jets_per_shard or min(1000, n) for split, n in jets_per_class.items()},
        "processes": {name: PROCESSES[settings.processes[name]].description for name in settings.classes},
    })
    if (out_dir / Manifest.FILENAME).exists():
        manifest = Manifest.load(out_dir)
        differences = _differences(manifest.source, source)
        if differences or manifest.chunk_size != chunk_size:
            if manifest.chunk_size != chunk_size:
                differences.append(f"chunk_size: existing {manifest.chunk_size}, requested {chunk_size}")
            raise DataError(
                f"{out_dir} already holds a dataset generated with other settings:\n  "
                + "\n  ".join(differences)
                + "\nrerun with the original settings to continue it, or choose a new directory"
            )
    else:
        manifest = Manifest(
            source=source,
            particle_features=list(PARTICLE_FEATURES),
            jet_features=list(JET_FEATURES),
            classes=list(settings.classes),
            max_particles=settings.max_particles,
            chunk_size=chunk_size,
            created_by=creation_info(),
        )
        manifest.save(out_dir)

    done = manifest.completed_units()
    todo = [u for u in units if not (u.unit_id in done and (out_dir / u.relpath).exists())]
    n_classes = len(settings.classes)
    total = sum(u.n_per_class for u in units) * n_classes
    remaining = sum(u.n_per_class for u in todo) * n_classes
    tasks = [UnitTask(str(out_dir), u, settings, seed, chunk_size) for u in todo]

    def finish(result: dict) -> None:
        manifest.add_shard(result["split"], result["record"])
        manifest.save(out_dir)

    with tqdm(total=total, initial=total - remaining, unit="jet", desc=f"generate {preset}",
              disable=not progress, smoothing=0, dynamic_ncols=True) as bar:
        # smoothing=0: the ETA from the mean rate; a moving average kept the first, slow update
        # (Pythia start-up before any jet) for minutes and showed an ETA of hours
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                finish(run_unit(task, bar.update))
        else:
            _run_pool(tasks, workers, bar, finish)
    return manifest


def _run_pool(tasks: list[UnitTask], workers: int, bar, finish: Callable[[dict], None]) -> None:
    """Run units in `workers` spawned processes; a worker that raises or dies stops the run
    (finished units stay in the manifest)."""
    context = multiprocessing.get_context("spawn")
    todo, results = context.Queue(), context.Queue()
    processes = [context.Process(target=_worker_loop, args=(todo, results), daemon=True)
                 for _ in range(min(workers, len(tasks)))]
    for task in tasks:
        todo.put(task)
    for _ in processes:
        todo.put(None)
    for process in processes:
        process.start()
    try:
        remaining = len(tasks)
        while remaining:
            try:
                kind, *payload = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise DataError(
                        f"a generator worker died (exit code {dead[0]}; -9 usually means out of memory); "
                        "finished units are kept, rerun the same command to continue"
                    ) from None
                continue
            if kind == "progress":
                bar.update(payload[0])
            elif kind == "done":
                finish(payload[0])
                remaining -= 1
            else:
                error, where = payload
                messages.error(f"in a generator worker:\n{where}")
                raise error
    finally:
        todo.cancel_join_thread()  # unsent tasks must not block the exit after an interrupt
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()


# ============================================================================ CLI
def _presets_help() -> str:
    lines = []
    for name, s in PRESETS.items():
        lines.append(
            f"  {name}: {s.sqrt_s / 1000:g} TeV, {s.pt_min:g} < pT < {s.pt_max:g} GeV, |eta| < {s.eta_max:g}, "
            f"MPI {'on' if s.mpi else 'off'}, classes {','.join(s.classes)}"
        )
    return "\n".join(lines)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `jetfm data generate`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Generate jets with Pythia 8 + FastJet (anti-kT) into WebDataset shards and manifest.json.\n"
        "Rerun the same command with the same OUT to continue an interrupted run.\n\npresets:\n" + _presets_help()
    )
    keys = "\n".join(f"  {key:16s} {text}" for key, text in OVERRIDE_HELP.items())
    parser.epilog = (
        f"--set keys:\n{keys}\n"
        "examples:\n"
        "  --set mpi=on --set pt_min=500 --set pt_max=700 --set max_particles=64\n"
        "  --set classes=QCD,Wqq,Zqq --set process.QCD=dijet\n"
        "  --set \"pythia=PartonLevel:ISR = off; PartonLevel:FSR = on\""
    )
    parser.add_argument("out", type=Path, help="output directory (shards + manifest.json)")
    parser.add_argument("--preset", default="toptag", choices=sorted(PRESETS), help="physics preset (default toptag)")
    parser.add_argument("--train", type=int, default=1000, help="jets PER CLASS in the train split (default 1000)")
    parser.add_argument("--val", type=int, default=200, help="jets per class in the val split (default 200)")
    parser.add_argument("--test", type=int, default=200, help="jets per class in the test split (default 200)")
    parser.add_argument("--workers", type=int, default=1, help="parallel generator processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="master seed; every unit and class derives its own")
    parser.add_argument("--jets-per-shard", type=int, default=None,
                        help="jets per class in one shard (= one work unit); default min(1000, split size)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="jets per tar entry, the reader's unit of work (default: a quarter of the smallest split, "
                             "at most 1000, so that every split feeds 2 processes x 2 loader workers)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                        help="override a preset setting (repeatable; see below)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and units, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_generate(args: argparse.Namespace) -> int:
    try:
        overrides = parse_assignments(args.overrides)
        counts = {"train": args.train, "val": args.val, "test": args.test}
        counts = {split: n for split, n in counts.items() if n > 0}
        if args.chunk_size is None:  # a chunk per consumer: a split of one chunk cannot feed 2 processes
            n_classes = len(resolve_settings(args.preset, overrides).classes)
            args.chunk_size = min(1000, max(1, -(-min(counts.values(), default=4) * n_classes // 4)))
        if args.dry_run:
            settings = resolve_settings(args.preset, overrides)
            units = plan_units(counts, args.jets_per_shard)
            messages.output(json.dumps({"settings": settings.to_json(), "seed": args.seed, "jets_per_class": counts,
                                        "units": [u.relpath for u in units]}, indent=1))
            return 0
        manifest = generate_dataset(
            args.out, args.preset, counts, workers=args.workers, seed=args.seed,
            jets_per_shard=args.jets_per_shard, chunk_size=args.chunk_size, overrides=overrides,
            progress=not args.no_progress,
        )
    except DataError as error:
        messages.error(str(error))
        return 2
    except KeyboardInterrupt:
        messages.info(f"interrupted; finished shards are kept — rerun the same command to continue {args.out}")
        return 130
    lines = [f"wrote {args.out}/{Manifest.FILENAME}"]
    for split in manifest.splits:
        per_class = dict(zip(manifest.classes, manifest.class_counts(split)))
        lines.append(f"  {split}: {manifest.n_jets(split)} jets {per_class} in {len(manifest.shards(split))} shards")
    messages.output("\n".join(lines))
    return 0
