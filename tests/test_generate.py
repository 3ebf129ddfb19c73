"""`jetfm data generate`: Pythia 8 + FastJet jets into shards (tiny samples; ~30 s on one core).

The module fixture generates one toptag dataset (train 2 units, val 1 unit); the other tests
compare against it byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, PID_FEATURES, DataError, JetArrays, decode_chunk
from jetfm.data.generate import (
    PARTICLE_FEATURES,
    add_generate_arguments,
    derived_seed,
    generate_dataset,
    plan_units,
    run_generate,
)
from jetfm.data.physics import jets_from_constituents
from jetfm.data.presets import PRESETS, apply_overrides, decay_matches
from jetfm.data.shards import Manifest

JETS = {"train": 40, "val": 10}
PER_SHARD = 20
MAX_PARTICLES = 48  # below the typical multiplicity, so truncation is exercised
OVERRIDES = {"max_particles": MAX_PARTICLES}


def read_shard(path: Path) -> JetArrays:
    entries: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, name = member.name.partition(".")
            entries[key][name] = tar.extractfile(member).read()
    return JetArrays.concat([decode_chunk(entries[key], f"{path}:{key}") for key in sorted(entries)])


def read_split(root: Path, split: str) -> JetArrays:
    manifest = Manifest.load(root)
    return JetArrays.concat([read_shard(root / shard["path"]) for shard in manifest.shards(split)])


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def generate(root: Path, **kwargs) -> Manifest:
    args = dict(preset="toptag", jets_per_class=JETS, seed=7, jets_per_shard=PER_SHARD,
                chunk_size=15, overrides=OVERRIDES, progress=False)
    args.update(kwargs)
    return generate_dataset(root, **args)


@pytest.fixture(scope="module")
def toptag(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toptag")
    generate(root)
    return root


# ------------------------------------------------------------------------- manifest and contents
def test_manifest_counts(toptag):
    manifest = Manifest.load(toptag)
    assert manifest.classes == ["QCD", "Tbqq"]
    assert manifest.particle_features == list(KINEMATIC_FEATURES + PID_FEATURES)
    assert manifest.jet_features == list(JET_FEATURES)
    assert manifest.max_particles == MAX_PARTICLES and manifest.chunk_size == 15
    assert manifest.n_jets("train") == 80 and manifest.class_counts("train") == [40, 40]
    assert manifest.n_jets("val") == 20 and manifest.class_counts("val") == [10, 10]
    assert [s["path"] for s in manifest.shards("train")] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert manifest.completed_units() == {"train/000000", "train/000001", "val/000000"}
    assert manifest.source["kind"] == "pythia8" and manifest.source["seed"] == 7
    assert manifest.source["settings"]["max_particles"] == MAX_PARTICLES
    assert not list(toptag.glob("*/*.tmp"))
    for shard in manifest.shards("train"):  # 40 jets per shard in chunks of 15
        assert shard["n_jets"] == 40 and shard["n_chunks"] == 3 and shard["class_counts"] == [20, 20]
    assert len(read_split(toptag, "train")) == 80


def test_jets_sorted_truncated_and_in_window(toptag):
    settings = PRESETS["toptag"]
    for split in ("train", "val"):
        jets = read_split(toptag, split)
        jet = {name: jets.jet[:, i] for i, name in enumerate(JET_FEATURES)}
        assert np.all((jet["jet_pt"] > settings.pt_min) & (jet["jet_pt"] < settings.pt_max))
        assert np.all(np.abs(jet["jet_eta"]) < settings.eta_max)
        # multiplicity = min(full count, max_particles); truncation actually happened
        n_full = jet["jet_nparticles"].astype(np.int64)
        assert np.array_equal(jets.multiplicity, np.minimum(n_full, MAX_PARTICLES))
        assert (n_full > MAX_PARTICLES).any() and (n_full < MAX_PARTICLES).any()
        # pT-descending within every jet
        pt = np.hypot(jets.part[:, 0], jets.part[:, 1])
        same_jet = np.diff(np.repeat(np.arange(len(jets)), jets.multiplicity)) == 0
        assert np.all(np.diff(pt)[same_jet] <= 0)
        # untruncated jets: the jet features are the sum of the stored constituents
        whole = np.flatnonzero(n_full <= MAX_PARTICLES)
        sub = jets.select(whole)
        summed = jets_from_constituents(sub.part[:, :4].astype(np.float64), sub.offsets)
        for name in ("jet_pt", "jet_eta", "jet_energy", "jet_mass"):
            np.testing.assert_allclose(summed[name], jet[name][whole], rtol=1e-4, atol=1e-3)
        # truncated jets: the stored hardest constituents carry less pT than the jet
        cut = jets.select(np.flatnonzero(n_full > MAX_PARTICLES))
        partial = jets_from_constituents(cut.part[:, :4].astype(np.float64), cut.offsets)
        assert np.all(partial["jet_energy"] < jet["jet_energy"][n_full > MAX_PARTICLES])


def test_particle_identification_features(toptag):
    jets = read_split(toptag, "train")
    names = list(PARTICLE_FEATURES)
    flags = jets.part[:, names.index("part_isChargedHadron"):]
    assert set(np.unique(flags)) <= {0.0, 1.0}
    assert np.all(flags.sum(1) == 1)  # every visible final particle is exactly one kind
    charge = jets.part[:, names.index("part_charge")]
    charged = flags[:, 0] + flags[:, 3] + flags[:, 4]  # charged hadrons, electrons, muons
    assert np.array_equal(charge != 0, charged == 1)
    assert 0.3 < (charge != 0).mean() < 0.9 and flags[:, 2].mean() > 0.1  # plenty of photons


def test_physics_top_mass_peak_and_qcd(toptag):
    jets = JetArrays.concat([read_split(toptag, "train"), read_split(toptag, "val")])
    mass = jets.jet[:, JET_FEATURES.index("jet_mass")]
    top, qcd = mass[jets.label == 1], mass[jets.label == 0]
    in_peak = lambda m: np.mean((m > 150) & (m < 200))  # noqa: E731
    assert 150 < np.median(top) < 200 and in_peak(top) > 0.5
    assert np.median(qcd) < 120 and in_peak(qcd) < 0.3 and in_peak(top) > 3 * in_peak(qcd)
    # top jets are 3-prong: more constituents than QCD jets on average
    n = jets.jet[:, JET_FEATURES.index("jet_nparticles")]
    assert n[jets.label == 1].mean() > n[jets.label == 0].mean()


# ------------------------------------------------------------------------- reproducibility
def test_same_seed_same_bytes_other_seed_differs(toptag, tmp_path):
    # a val-only run with the same seed reproduces the val shard: unit seeds depend on
    # (seed, split, unit), not on the other splits
    generate(tmp_path / "same", jets_per_class={"val": 10})
    assert (tmp_path / "same/val/shard-000000.tar").read_bytes() == (toptag / "val/shard-000000.tar").read_bytes()
    generate(tmp_path / "other", jets_per_class={"val": 10}, seed=8)
    other = read_split(tmp_path / "other", "val")
    assert not np.array_equal(other.jet, read_split(toptag, "val").jet)
    # shards mix the classes (shuffled within the unit)
    assert len(set(other.label[:10].tolist())) == 2


def test_interrupt_and_continue_gives_identical_dataset(toptag, tmp_path):
    root = tmp_path / "resumed"
    shutil.copytree(toptag, root)
    manifest = Manifest.load(root)
    # crash 1: the last train unit died mid-write (only its .tmp exists, no manifest entry)
    last = root / "train/shard-000001.tar"
    last.rename(last.with_name(last.name + ".tmp"))
    manifest.splits["train"] = [s for s in manifest.splits["train"] if s["unit"] != "train/000001"]
    # crash 2: the val shard was renamed into place but the manifest was not saved
    manifest.splits.pop("val")
    manifest.save(root)
    kept = root / "train/shard-000000.tar"
    kept_stat = kept.stat().st_mtime_ns

    resumed = generate(root)
    assert kept.stat().st_mtime_ns == kept_stat  # the finished unit was skipped
    assert shard_bytes(root) == shard_bytes(toptag)
    assert resumed.completed_units() == Manifest.load(toptag).completed_units()
    for split in ("train", "val"):
        assert resumed.n_jets(split) == Manifest.load(toptag).n_jets(split)
    assert not list(root.glob("*/*.tmp"))
    # a complete dataset reruns as a no-op
    generate(root)
    assert kept.stat().st_mtime_ns == kept_stat


def test_parallel_workers_give_identical_dataset(toptag, tmp_path):
    manifest = generate(tmp_path / "parallel", jets_per_class={"train": 40}, workers=2)  # 2 units, 2 processes
    assert manifest.class_counts("train") == [40, 40]
    train = {k: v for k, v in shard_bytes(toptag).items() if k.startswith("train/")}
    assert shard_bytes(tmp_path / "parallel") == train


def test_rerun_with_other_settings_raises(toptag, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(toptag, root)
    with pytest.raises(DataError, match="max_particles"):
        generate(root, overrides={"max_particles": 64})
    with pytest.raises(DataError, match="seed"):
        generate(root, seed=8)
    with pytest.raises(DataError, match="jets_per_class"):
        generate(root, jets_per_class={"train": 60, "val": 10})


# ------------------------------------------------------------------------- settings and errors
def test_unknown_preset_and_overrides_raise(tmp_path):
    with pytest.raises(DataError, match="known presets.*jetclass.*toptag"):
        generate_dataset(tmp_path, preset="nope", jets_per_class={"val": 1}, progress=False)
    with pytest.raises(DataError, match=r"'pt_mn'.*pt_min"):
        generate_dataset(tmp_path, jets_per_class={"val": 1}, overrides={"pt_mn": 500}, progress=False)
    with pytest.raises(DataError, match="on/off"):
        apply_overrides(PRESETS["toptag"], {"mpi": "maybe"})
    with pytest.raises(DataError, match="pt_min < pt_max"):
        apply_overrides(PRESETS["toptag"], {"pt_min": 700})
    with pytest.raises(DataError, match="seed"):
        apply_overrides(PRESETS["toptag"], {"pythia": "Random:seed = 3"})
    with pytest.raises(DataError, match="process"):
        apply_overrides(PRESETS["jetclass"], {"process.QCD": "nope"})
    with pytest.raises(DataError, match="rejected"):
        generate_dataset(tmp_path / "bad", jets_per_class={"val": 1}, overrides={"pythia": "Foo:bar = 1"},
                         progress=False)
    assert not list((tmp_path / "bad").glob("*/*.tar"))


def test_empty_window_raises(tmp_path, monkeypatch):
    import jetfm.data.generate as generate_module

    monkeypatch.setattr(generate_module, "_MAX_EVENTS_WITHOUT_JETS", 40)
    with pytest.raises(DataError, match="class QCD: no jet in the window"):
        generate_dataset(tmp_path, jets_per_class={"val": 1}, progress=False,
                         overrides={"classes": "QCD", "pt_min": 6000, "pt_max": 6500, "pthat_min": 100})


def test_overrides_apply_typed_and_from_strings():
    s = apply_overrides(PRESETS["jetclass"], {
        "mpi": "off", "pt_min": "600", "max_particles": "64", "classes": "QCD,Wqq",
        "process.QCD": "dijet", "pythia": "PartonLevel:ISR = off; PartonLevel:FSR = on",
    })
    assert s.mpi is False and s.pt_min == 600.0 and s.max_particles == 64 and s.classes == ["QCD", "Wqq"]
    assert s.processes["QCD"] == "dijet" and s.pythia == ["PartonLevel:ISR = off", "PartonLevel:FSR = on"]
    assert "PartonLevel:MPI = off" in s.pythia_lines("Wqq") and s.pythia_lines("Wqq")[-1] == "PartonLevel:FSR = on"
    assert s.pthat == pytest.approx(s.pthat_fraction * 600)
    assert PRESETS["jetclass"].mpi is True  # presets are not mutated
    assert PRESETS["jetclass"].classes == ["QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl"]


def test_units_seeds_and_decay_patterns():
    units = plan_units({"train": 2500, "val": 200}, None)
    assert [(u.split, u.index, u.n_per_class) for u in units] == [
        ("train", 0, 1000), ("train", 1, 1000), ("train", 2, 500), ("val", 0, 200)]
    seeds = {derived_seed(0, split, k, c) for split in ("train", "val") for k in range(50) for c in range(-1, 10)}
    assert len(seeds) == 2 * 50 * 11 and all(1 <= s < 900_000_000 for s in seeds)
    assert derived_seed(3, "train", 1, 2) == derived_seed(3, "train", 1, 2) != derived_seed(4, "train", 1, 2)
    assert decay_matches([5, 2, -1], "QQQ") and not decay_matches([5, 11, -12], "QQQ")
    assert decay_matches([-5, -11, 12], "Qlv") and not decay_matches([-5, -15, 16], "Qlv")
    assert decay_matches([5, -5], "bb") and not decay_matches([4, -4], "bb") and decay_matches([21, 21], "gg")
    assert decay_matches([1, -2, 13, -14], "QQlv") and not decay_matches([1, -2, 3, -4], "QQlv")


def test_cli_help_dry_run_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="jetfm data generate")
    add_generate_arguments(parser)
    assert "--set" in parser.format_help() and "jetclass" in parser.format_help()
    args = parser.parse_args([str(tmp_path / "d"), "--preset", "jetclass", "--train", "2500", "--test", "0",
                              "--set", "mpi=off", "--set", "pythia=PartonLevel:ISR = off", "--dry-run"])
    assert run_generate(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["mpi"] is False and plan["settings"]["pythia"] == ["PartonLevel:ISR = off"]
    assert plan["units"] == ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                             "val/shard-000000.tar"]
    assert not (tmp_path / "d").exists()
    args = parser.parse_args([str(tmp_path / "d"), "--set", "nope=1"])
    assert run_generate(args) == 2 and "nope" in capsys.readouterr().err


def test_cli_generates(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--train", "3", "--val", "0", "--test", "2", "--no-progress",
                              "--set", "max_particles=16"])
    assert run_generate(args) == 0
    manifest = Manifest.load(tmp_path)
    assert manifest.class_counts("train") == [3, 3] and manifest.class_counts("test") == [2, 2]
    assert "val" not in manifest.splits
    assert read_split(tmp_path, "test").multiplicity.max() <= 16


# ------------------------------------------------------------------------- jetclass
def mass_peak(mass: np.ndarray) -> float:
    """Centre of the most populated 6 GeV bin after [1, 2, 1] smoothing."""
    counts, edges = np.histogram(mass, bins=np.arange(0, 252, 6))
    k = int(np.argmax(np.convolve(counts, [1, 2, 1], "same")))
    return 0.5 * (edges[k] + edges[k + 1])


def test_jetclass_smoke_every_class(tmp_path):
    """Every JetClass process initialises, and truth matching yields jets of every class."""
    manifest = generate_dataset(tmp_path, "jetclass", {"train": 3}, seed=1, progress=False,
                                overrides={"mpi": "off"})
    assert manifest.classes == ["QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl"]
    assert manifest.class_counts("train") == [3] * 10
    jets = read_split(tmp_path, "train")
    assert np.all((jets.jet[:, 0] > 500) & (jets.jet[:, 0] < 1000) & (np.abs(jets.jet[:, 1]) < 2))
    assert manifest.source["settings"]["pythia_lines"]["Hbb"][-2:] == ["25:onMode = off", "25:onIfAny = 5"]


@pytest.mark.slow
def test_jetclass_masses_with_mpi(tmp_path):
    """The default jetclass preset (MPI on): resonance masses, shifted up a little by the
    underlying event in these ungroomed R=0.8 jets (about 1 min)."""
    n = 40
    manifest = generate_dataset(tmp_path, "jetclass", {"train": n}, seed=1, progress=False)
    assert manifest.class_counts("train") == [n] * 10
    jets = read_split(tmp_path, "train")
    mass = jets.jet[:, JET_FEATURES.index("jet_mass")]
    median = {name: float(np.median(mass[jets.label == c])) for c, name in enumerate(manifest.classes)}
    for name in ("Hbb", "Hcc", "Hgg", "H4q"):
        assert 110 < median[name] < 150, median
    assert 80 < median["Wqq"] < 100 and 85 < median["Zqq"] < 110, median
    assert 160 < median["Tbqq"] < 195 and median["QCD"] < 100, median


def test_w_and_z_mass_peaks(tmp_path):
    """W and Z jets peak at their masses, QCD jets do not (MPI off for clean peaks; ~6 s)."""
    n = 100
    manifest = generate_dataset(tmp_path, "jetclass", {"train": n}, seed=2, progress=False,
                                overrides={"classes": "QCD,Wqq,Zqq", "mpi": False})
    assert manifest.classes == ["QCD", "Wqq", "Zqq"] and manifest.class_counts("train") == [n] * 3
    jets = read_split(tmp_path, "train")
    mass = {name: jets.jet[jets.label == c, JET_FEATURES.index("jet_mass")] for c, name in enumerate(manifest.classes)}
    peak = {name: mass_peak(m) for name, m in mass.items()}
    core = {name: float(np.median(m[(m > 50) & (m < 130)])) for name, m in mass.items()}
    assert 74 < peak["Wqq"] < 88 and 76 < core["Wqq"] < 86, (peak, core)
    assert 86 < peak["Zqq"] < 99 and 87 < core["Zqq"] < 97, (peak, core)
    window = {name: np.mean((m > 70) & (m < 100)) for name, m in mass.items()}
    assert window["QCD"] < 0.5 * min(window["Wqq"], window["Zqq"]), window
