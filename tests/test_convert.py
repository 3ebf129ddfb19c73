"""`jetfm data convert`: JetClass ROOT and top-tagging HDF5 files in their real layouts -> shards.

Every test writes its own tiny input files (uproot mktree TTrees, pandas fixed/table HDF5) with
known four-momenta and checks the converted jets against them.
"""

from __future__ import annotations

import argparse
import json

import awkward as ak
import numpy as np
import pandas as pd
import pytest
import uproot

from jetfm.data import convert_toptag_hdf5
from jetfm.data.convert import (
    JETCLASS_CLASSES,
    add_convert_arguments,
    convert_jetclass,
    convert_toptag,
    run_convert,
)
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, PID_FEATURES, DataError, JetArrays
from jetfm.data.reader import iterate_jets, verify_shards
from jetfm.data.shards import Manifest

IMPACT = ("part_d0val", "part_d0err", "part_dzval", "part_dzerr")
#: Particle branches of a real JetClass file: the stored ones first, then deta/dphi (not stored).
JC_PARTICLE_BRANCHES = KINEMATIC_FEATURES + PID_FEATURES + IMPACT + ("part_deta", "part_dphi")
JC_STORED = KINEMATIC_FEATURES + PID_FEATURES + IMPACT
JC_JET_BRANCHES = ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles",
                   "jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4")


# ----------------------------------------------------------------------------- input writers
def four_momenta(rng, m):
    """(m, 4) px, py, pz, E float32 of massless particles around an axis, in random pT order."""
    pt = rng.exponential(20.0, m) + 0.5
    eta = rng.normal(0.3, 0.3, m)
    phi = rng.normal(1.0, 0.3, m)
    return np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], 1).astype(np.float32)


def jetclass_truth(rng, n, first_id=0, max_mult=20, n_classes=10):
    """Jets as a JetClass file holds them. jet_sdmass carries a unique jet id for bookkeeping."""
    parts, jets = [], []
    for b in range(n):
        p4 = four_momenta(rng, int(rng.integers(1, max_mult)))
        extra = rng.normal(size=(len(p4), len(JC_PARTICLE_BRANCHES) - 4)).astype(np.float32)
        parts.append(np.concatenate([p4, extra], 1))
        total = p4.astype(np.float64).sum(0)
        pt = np.hypot(total[0], total[1])
        jets.append([pt, np.arcsinh(total[2] / pt), np.arctan2(total[1], total[0]), total[3], len(p4),
                     first_id + b, *rng.random(4)])
    return {"parts": parts, "jet": np.array(jets, np.float32), "label": rng.integers(0, n_classes, n)}


def write_jetclass(path, truth, *, label_dtype="bool", part_dtype="float32", drop=(), onehot=None):
    """A TTree `tree` in the JetClass layout (jagged part_*, flat jet_*, one-hot label_*)."""
    counts = [len(p) for p in truth["parts"]]
    flat = np.concatenate(truth["parts"])
    branches, types = {}, {}
    for j, name in enumerate(JC_PARTICLE_BRANCHES):
        branches[name] = ak.unflatten(flat[:, j].astype(part_dtype), counts)
        types[name] = f"var * {part_dtype}"
    for j, name in enumerate(JC_JET_BRANCHES):
        branches[name] = truth["jet"][:, j]
        types[name] = "float32"
    onehot = np.eye(10)[truth["label"]] if onehot is None else onehot
    for k, name in enumerate(JETCLASS_CLASSES):
        branches[f"label_{name}"] = onehot[:, k].astype(label_dtype)
        types[f"label_{name}"] = np.dtype(label_dtype)
    for name in drop:
        del branches[name], types[name]
    half = len(counts) // 2  # two baskets per branch
    with uproot.recreate(path) as file:
        tree = file.mktree("tree", types)
        tree.extend({k: v[:half] for k, v in branches.items()})
        tree.extend({k: v[half:] for k, v in branches.items()})


def expected_particles(part, max_particles):
    """pT-descending (stable), truncated."""
    order = np.argsort(-np.hypot(part[:, 0], part[:, 1]), kind="stable")
    return part[order][:max_particles]


def read_back(out_dir, split="train"):
    return JetArrays.concat(list(iterate_jets(out_dir, split)))


def by_id(jets, id_column):
    """{jet id: jet index} from the id stored in jet feature `id_column`."""
    return {int(round(v)): i for i, v in enumerate(jets.jet[:, id_column])}


# ----------------------------------------------------------------------------- JetClass
@pytest.mark.parametrize("label_dtype,part_dtype", [("bool", "float32"), ("int32", "float64"), ("float32", "float32")])
def test_jetclass_round_trip(tmp_path, label_dtype, part_dtype):
    rng = np.random.default_rng(1)
    truths = [jetclass_truth(rng, 23, first_id=0), jetclass_truth(rng, 17, first_id=100)]
    for k, truth in enumerate(truths):
        write_jetclass(tmp_path / f"HToBB_{k:03d}.root", truth, label_dtype=label_dtype, part_dtype=part_dtype)
    out = tmp_path / "out"
    manifest = convert_jetclass([str(tmp_path / "HToBB_*.root")], out, max_particles=8, chunk_size=6,
                                jets_per_shard=15, progress=False)

    assert manifest.particle_features == list(JC_STORED)
    assert manifest.jet_features == list(JET_FEATURES) + ["jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4"]
    assert manifest.classes == list(JETCLASS_CLASSES)
    assert manifest.source["kind"] == "jetclass" and len(manifest.source["files"]) == 2
    assert [s["path"] for s in manifest.splits["train"]] == [f"train/shard-{k:06d}.tar" for k in range(3)]
    assert [s["n_jets"] for s in manifest.splits["train"]] == [15, 15, 10]
    assert "jetfm_version" in manifest.created_by and "command" in manifest.created_by
    verify_shards(out, Manifest.load(out))

    jets = read_back(out)
    sd = manifest.jet_features.index("jet_sdmass")
    index = by_id(jets, sd)
    assert len(jets) == 40 and len(index) == 40
    for truth, first_id in zip(truths, (0, 100)):
        for b, part in enumerate(truth["parts"]):
            i = index[first_id + b]
            got = jets.part[jets.offsets[i]:jets.offsets[i + 1]]
            np.testing.assert_array_equal(got, expected_particles(part[:, :len(JC_STORED)], 8))
            assert jets.label[i] == truth["label"][b]
            pt, eta, phi, energy, n_part = truth["jet"][b, :5].astype(np.float64)
            mass = np.sqrt(max(energy**2 - (pt * np.cosh(eta)) ** 2, 0.0))  # by hand
            np.testing.assert_allclose(jets.jet[i, :6], [pt, eta, phi, energy, mass, n_part], rtol=1e-6, atol=1e-4)
            np.testing.assert_array_equal(jets.jet[i, 6:], truth["jet"][b, 5:])
    assert jets.multiplicity.max() == 8  # truncated


def test_jetclass_mass_of_a_known_jet(tmp_path):
    truth = jetclass_truth(np.random.default_rng(2), 3)
    pt, eta = 500.0, 0.5
    truth["jet"][0, :4] = [pt, eta, 0.1, np.sqrt(100.0**2 + (pt * np.cosh(eta)) ** 2)]  # a 100 GeV jet
    write_jetclass(tmp_path / "a.root", truth)
    convert_jetclass([str(tmp_path / "a.root")], tmp_path / "out", progress=False)
    jets = read_back(tmp_path / "out")
    assert abs(jets.jet[by_id(jets, 6)[0], 4] - 100.0) < 1e-2


def test_jetclass_optional_branches_are_optional(tmp_path):
    truth = jetclass_truth(np.random.default_rng(3), 5)
    drop = PID_FEATURES + IMPACT + ("jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4")
    write_jetclass(tmp_path / "a.root", truth, drop=drop)
    manifest = convert_jetclass(str(tmp_path / "a.root"), tmp_path / "out", progress=False)
    assert manifest.particle_features == list(KINEMATIC_FEATURES)
    assert manifest.jet_features == list(JET_FEATURES)


@pytest.mark.parametrize("missing", ["part_energy", "jet_nparticles", "label_Tbl"])
def test_jetclass_missing_branch(tmp_path, missing):
    path = tmp_path / "broken.root"
    write_jetclass(path, jetclass_truth(np.random.default_rng(4), 4), drop=(missing,))
    with pytest.raises(DataError) as error:
        convert_jetclass([str(path)], tmp_path / "out", progress=False)
    message = str(error.value)
    assert str(path) in message and missing in message and "expected" in message
    assert not (tmp_path / "out").exists()


def _bad_jetclass(rng, n=12):
    truth = jetclass_truth(rng, n)
    truth["parts"][3][-1, 1] = np.nan  # NaN particle in entry 3
    truth["parts"][5] = truth["parts"][5][:0]  # empty jet in entry 5
    truth["jet"][5, 4] = 0
    onehot = np.eye(10)[truth["label"]]
    onehot[7, (truth["label"][7] + 1) % 10] = 1  # two classes set in entry 7
    truth["jet"][9, 4] += 1  # jet_nparticles disagrees in entry 9
    return truth, onehot


@pytest.mark.parametrize("entry,word", [(3, "NaN"), (5, "no particles"), (7, "one-hot"), (9, "jet_nparticles")])
def test_jetclass_bad_jets_raise(tmp_path, entry, word):
    truth, onehot = _bad_jetclass(np.random.default_rng(5))
    # keep only the one defect under test
    clean, clean_onehot = jetclass_truth(np.random.default_rng(5), 12), np.eye(10)[truth["label"]]
    clean["label"] = truth["label"]
    clean["parts"][entry], clean["jet"][entry] = truth["parts"][entry], truth["jet"][entry]
    clean_onehot[entry] = onehot[entry]
    path = tmp_path / "bad.root"
    write_jetclass(path, clean, onehot=clean_onehot)
    with pytest.raises(DataError) as error:
        convert_jetclass([str(path)], tmp_path / "out", chunk_size=4, progress=False)
    message = str(error.value)
    assert str(path) in message and f"entry {entry}" in message and word in message and "--skip-bad" in message


def test_jetclass_skip_bad_counts(tmp_path):
    truth, onehot = _bad_jetclass(np.random.default_rng(6))
    write_jetclass(tmp_path / "bad.root", truth, onehot=onehot, label_dtype="float64")
    manifest = convert_jetclass([str(tmp_path / "bad.root")], tmp_path / "out", chunk_size=4, skip_bad=True,
                                progress=False)
    assert manifest.skipped == {"nonfinite": 1, "empty": 1, "label": 1, "nparticles": 1}
    assert Manifest.load(tmp_path / "out").skipped == manifest.skipped
    jets = read_back(tmp_path / "out")
    assert sorted(by_id(jets, 6)) == [b for b in range(12) if b not in (3, 5, 7, 9)]


def test_jetclass_unequal_particle_branches(tmp_path):
    truth = jetclass_truth(np.random.default_rng(7), 6)
    path = tmp_path / "ragged.root"
    write_jetclass(path, truth)
    # rewrite with part_py one particle short in entry 2
    counts = [len(p) for p in truth["parts"]]
    arrays = uproot.open(path)["tree"].arrays(library="ak")
    branches = {name: arrays[name] for name in arrays.fields if not name.startswith("n")}
    py = ak.to_list(branches["part_py"])
    py[2] = py[2][:-1]
    branches["part_py"] = ak.values_astype(ak.Array(py), np.float32)
    types = {k: (f"var * float32" if k.startswith("part_") else v.type.content) for k, v in branches.items()}
    with uproot.recreate(path) as file:
        file.mktree("tree", {k: (t if isinstance(t, str) else str(t)) for k, t in types.items()}).extend(branches)
    assert counts[2] > 1
    with pytest.raises(DataError, match=r"entry 2: particle arrays of unequal length"):
        convert_jetclass([str(path)], tmp_path / "out", progress=False)
    manifest = convert_jetclass([str(path)], tmp_path / "out", skip_bad=True, progress=False)
    assert manifest.skipped == {"shape": 1} and manifest.n_jets("train") == 5


def test_failed_conversion_leaves_directory_as_it_was(tmp_path):
    rng = np.random.default_rng(8)
    write_jetclass(tmp_path / "a.root", jetclass_truth(rng, 30))
    truth, onehot = _bad_jetclass(rng)
    write_jetclass(tmp_path / "b.root", truth, onehot=onehot)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="b.root"):
        convert_jetclass([str(tmp_path / "a.root"), str(tmp_path / "b.root")], out, jets_per_shard=10,
                         chunk_size=5, interleave=1, progress=False)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tar*"))


def test_split_fractions_are_deterministic(tmp_path):
    rng = np.random.default_rng(9)
    files = []
    for k in range(3):
        files.append(str(tmp_path / f"f{k}.root"))
        write_jetclass(files[-1], jetclass_truth(rng, 70, first_id=1000 * k))

    def splits(out, **kwargs):
        manifest = convert_jetclass(files, out, split=None, split_fractions="0.6,0.2,0.2", progress=False, **kwargs)
        return {s: sorted(by_id(read_back(out, s), 6)) for s in ("train", "val", "test")}, manifest

    a, manifest = splits(tmp_path / "a", chunk_size=7, interleave=1)
    b, _ = splits(tmp_path / "b", chunk_size=32, interleave=3)  # other chunking and file order
    c, _ = splits(tmp_path / "c", seed=1)
    assert a == b
    assert a != c
    everything = sorted(a["train"] + a["val"] + a["test"])
    assert everything == sorted(1000 * k + b for k in range(3) for b in range(70))
    assert 90 < len(a["train"]) < 160 and len(a["val"]) > 20 and len(a["test"]) > 20
    assert manifest.source["conversions"][0]["split_fractions"] == [0.6, 0.2, 0.2]


def test_append_splits_and_refuse_duplicates(tmp_path):
    rng = np.random.default_rng(10)
    for name, first in (("a", 0), ("b", 100), ("c", 200)):
        write_jetclass(tmp_path / f"{name}.root", jetclass_truth(rng, 12, first_id=first))
    out = tmp_path / "out"
    convert_jetclass(str(tmp_path / "a.root"), out, jets_per_shard=5, progress=False)
    convert_jetclass(str(tmp_path / "b.root"), out, split="val", progress=False)
    manifest = convert_jetclass(str(tmp_path / "c.root"), out, jets_per_shard=5, progress=False)
    assert [s["path"] for s in manifest.splits["train"]] == [f"train/shard-{k:06d}.tar" for k in range(6)]
    assert manifest.n_jets("train") == 24 and manifest.n_jets("val") == 12
    assert len(manifest.source["files"]) == 3 and len(manifest.source["conversions"]) == 3
    assert sorted(by_id(read_back(out, "train"), 6)) == list(range(12)) + list(range(200, 212))
    assert json.loads((out / "manifest.json").read_text())["counts"]["val"]["n_jets"] == 12

    with pytest.raises(DataError, match="already holds"):
        convert_jetclass(str(tmp_path / "a.root"), out, progress=False)
    write_toptag(tmp_path / "t.h5", toptag_truth(rng, 5), "fixed")
    with pytest.raises(DataError, match="jetclass"):
        convert_toptag(str(tmp_path / "t.h5"), out, progress=False)
    with pytest.raises(DataError, match="max_particles"):
        convert_jetclass(str(tmp_path / "b.root"), tmp_path / "out", split="test", max_particles=16, progress=False)


def test_globs_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        convert_jetclass(str(tmp_path / "*.root"), tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no such file"):
        convert_jetclass(str(tmp_path / "nope.root"), tmp_path / "out", progress=False)
    (tmp_path / "text.root").write_text("not root")
    with pytest.raises(DataError, match="text.root"):
        convert_jetclass(str(tmp_path / "text.root"), tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- top tagging
N_SLOTS = 20


def toptag_truth(rng, n, max_mult=N_SLOTS):
    """Jets as the top-tagging files hold them; most pT-ordered, every third one not."""
    parts = []
    for b in range(n):
        p4 = four_momenta(rng, int(rng.integers(1, max_mult + 1)))
        if b % 3:
            p4 = p4[np.argsort(-np.hypot(p4[:, 0], p4[:, 1]), kind="stable")]
        parts.append(p4)
    return {"parts": parts, "label": rng.integers(0, 2, n)}


def write_toptag(path, truth, fmt, drop=(), label=None):
    """pandas HDF5, key 'table': E_i PX_i PY_i PZ_i (zero padded), truth*, ttv, is_signal_new."""
    n = len(truth["parts"])
    columns = {}
    for i in range(N_SLOTS):
        for q, j in (("E", 3), ("PX", 0), ("PY", 1), ("PZ", 2)):
            columns[f"{q}_{i}"] = np.array([p[i, j] if i < len(p) else 0.0 for p in truth["parts"]], np.float32)
    for q in ("truthE", "truthPX", "truthPY", "truthPZ"):
        columns[q] = np.zeros(n, np.float32)
    columns["ttv"] = np.zeros(n, np.int64)
    columns["is_signal_new"] = truth["label"] if label is None else label
    frame = pd.DataFrame({k: v for k, v in columns.items() if k not in drop})
    frame.to_hdf(path, key="table", format=fmt)


@pytest.mark.parametrize("fmt", ["fixed", "table"])
def test_toptag_round_trip(tmp_path, fmt, monkeypatch):
    rng = np.random.default_rng(11)
    truth = toptag_truth(rng, 33)
    write_toptag(tmp_path / "train.h5", truth, fmt)
    reads = []
    original = convert_toptag_hdf5.TopTagFile._read

    def spy(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(convert_toptag_hdf5.TopTagFile, "_read", spy)
    manifest = convert_toptag([str(tmp_path / "train.h5")], tmp_path / "out", max_particles=10, chunk_size=8,
                              progress=False)
    assert max(reads) <= 8 and sum(reads) == 33  # read in chunks, never whole
    assert manifest.classes == ["QCD", "Tbqq"]
    assert manifest.particle_features == list(KINEMATIC_FEATURES)
    assert manifest.jet_features == list(JET_FEATURES)
    assert manifest.source["kind"] == "toptag"

    jets = read_back(tmp_path / "out")
    assert len(jets) == 33  # one file, one split: jets stay in file order
    for b, p4 in enumerate(truth["parts"]):
        got = jets.part[jets.offsets[b]:jets.offsets[b + 1]]
        np.testing.assert_array_equal(got, expected_particles(p4, 10))
        assert jets.label[b] == truth["label"][b]
        total = p4.astype(np.float64).sum(0)  # all constituents, before truncation
        pt = np.hypot(total[0], total[1])
        mass = np.sqrt(max(total[3] ** 2 - pt**2 - total[2] ** 2, 0.0))
        expected = [pt, np.arcsinh(total[2] / pt), np.arctan2(total[1], total[0]), total[3], mass, len(p4)]
        np.testing.assert_allclose(jets.jet[b], expected, rtol=1e-5, atol=1e-3)
    assert jets.multiplicity.max() == 10 and jets.jet[:, 5].max() > 10


def test_toptag_missing_column(tmp_path):
    path = tmp_path / "val.h5"
    write_toptag(path, toptag_truth(np.random.default_rng(12), 4), "fixed", drop=("is_signal_new", "PZ_7"))
    with pytest.raises(DataError) as error:
        convert_toptag([str(path)], tmp_path / "out", progress=False)
    message = str(error.value)
    assert str(path) in message and "is_signal_new" in message and "PZ_7" in message and "E_i PX_i" in message
    other = tmp_path / "other.h5"
    pd.DataFrame({"x": [1.0]}).to_hdf(other, key="jets")
    with pytest.raises(DataError, match="no key 'table'"):
        convert_toptag([str(other)], tmp_path / "out", progress=False)


@pytest.mark.parametrize("fmt", ["fixed", "table"])
def test_toptag_bad_rows(tmp_path, fmt):
    rng = np.random.default_rng(13)
    truth = toptag_truth(rng, 10)
    truth["parts"][2][0, 3] = np.inf  # row 2: inf energy
    truth["parts"][4] = truth["parts"][4][:0]  # row 4: all padding
    label = truth["label"].copy()
    label[6] = 2  # row 6: not 0/1
    path = tmp_path / "test.h5"
    write_toptag(path, truth, fmt, label=label)
    with pytest.raises(DataError) as error:
        convert_toptag([str(path)], tmp_path / "out", chunk_size=3, progress=False)
    assert str(path) in str(error.value) and "row 2" in str(error.value) and "inf" in str(error.value)
    manifest = convert_toptag([str(path)], tmp_path / "out", chunk_size=3, skip_bad=True, progress=False)
    assert manifest.skipped == {"nonfinite": 1, "empty": 1, "label": 1}
    assert manifest.n_jets("train") == 7


def test_cli(tmp_path):
    rng = np.random.default_rng(14)
    for k in range(2):
        write_toptag(tmp_path / f"part{k}.h5", toptag_truth(rng, 9), "table")
    parser = add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["toptag", str(tmp_path / "part*.h5"), "--out", str(tmp_path / "out"),
                              "--split-fractions", "0.5,0.25,0.25", "--chunk-size", "4", "--no-progress"])
    assert run_convert(args) == 0
    manifest = Manifest.load(tmp_path / "out")
    assert sum(manifest.n_jets(s) for s in manifest.splits) == 18
    with pytest.raises(SystemExit):  # --split and --split-fractions exclude each other
        parser.parse_args(["toptag", "x.h5", "--out", "o", "--split", "val", "--split-fractions", "1,0,0"])
    bad = parser.parse_args(["toptag", str(tmp_path / "part0.h5"), "--out", str(tmp_path / "o2"),
                             "--split-fractions", "0.5,0.5", "--no-progress"])
    assert run_convert(bad) == 2


def test_first_bad_row_is_reported(tmp_path):
    truth = toptag_truth(np.random.default_rng(15), 8)
    truth["parts"][5][0, 0] = np.nan
    label = truth["label"].copy()
    label[1] = -1
    write_toptag(tmp_path / "t.h5", truth, "fixed", label=label)
    with pytest.raises(DataError, match=r"row 1: invalid label \(is_signal_new = -1, expected 0 or 1"):
        convert_toptag(str(tmp_path / "t.h5"), tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- hostile table-format files
class _Payload:
    """Unpickling this creates `marker` (what a hostile file's attribute could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, where, attribute, marker):
    """Replace one pickled attribute of a pandas table-format file with a payload pickle."""
    import pickle

    import h5py

    with h5py.File(path, "r+") as h5:
        h5[where].attrs[attribute] = np.bytes_(pickle.dumps([_Payload(marker)], protocol=0))


def test_table_format_payload_in_non_index_axes_never_runs(tmp_path):
    truth = toptag_truth(np.random.default_rng(16), 12)
    path = tmp_path / "evil.h5"
    write_toptag(path, truth, "table")
    marker = tmp_path / "marker"
    _plant(path, "table", "non_index_axes", marker)

    manifest = convert_toptag(str(path), tmp_path / "out", max_particles=N_SLOTS, progress=False)
    assert not marker.exists()  # nothing of the file was unpickled
    assert manifest.n_jets("train") == 12  # and the jets are the right ones
    jets = read_back(tmp_path / "out")
    for b, p4 in enumerate(truth["parts"]):
        np.testing.assert_array_equal(jets.part[jets.offsets[b]:jets.offsets[b + 1]], expected_particles(p4, N_SLOTS))
    np.testing.assert_array_equal(jets.label, truth["label"])

    # the payload is live: the explicit opt-in (pandas/PyTables) runs it (and then trips on its result)
    with pytest.raises(TypeError):
        convert_toptag(str(path), tmp_path / "trusted", progress=False, allow_pickle=True)
    assert marker.exists()


def test_table_format_payload_in_column_names_is_refused(tmp_path):
    path = tmp_path / "evil.h5"
    write_toptag(path, toptag_truth(np.random.default_rng(17), 6), "table")
    marker = tmp_path / "marker"
    _plant(path, "table/table", "values_block_0_kind", marker)
    parser = add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["toptag", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(DataError) as error:
        run_convert(args)
    message = str(error.value)
    assert str(path) in message and "values_block_0_kind" in message
    assert "--allow-pickle" in message and "run code" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_table_format_data_columns(tmp_path):
    """Data columns are fields of their own, named after the column (no pickle needed)."""
    truth = toptag_truth(np.random.default_rng(18), 9)
    path = tmp_path / "dc.h5"
    write_toptag(path, truth, "table")
    frame = pd.read_hdf(path, "table")
    frame.to_hdf(tmp_path / "dc2.h5", key="table", format="table", data_columns=["is_signal_new", "E_0"])
    convert_toptag(str(tmp_path / "dc2.h5"), tmp_path / "out", max_particles=N_SLOTS, progress=False)
    jets = read_back(tmp_path / "out")
    np.testing.assert_array_equal(jets.label, truth["label"])
    for b, p4 in enumerate(truth["parts"]):
        np.testing.assert_array_equal(jets.part[jets.offsets[b]:jets.offsets[b + 1]], expected_particles(p4, N_SLOTS))


# ----------------------------------------------------------------------------- interrupted conversions
def _shard_jets(out_dir):
    """{shard path: its chunks' arrays} of a finished dataset, with the manifest's records."""
    manifest = Manifest.load(out_dir)
    from jetfm.data.reader import read_shard_chunks

    shards = {}
    for split in sorted(manifest.splits):
        for record in manifest.splits[split]:
            chunks = list(read_shard_chunks(out_dir, record, manifest))
            shards[record["path"]] = (record, JetArrays.concat(chunks))
    return shards


def test_sigterm_mid_conversion_then_rerun_equals_uninterrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(19)
    for k in range(4):
        write_toptag(tmp_path / f"in{k}.h5", toptag_truth(rng, 600), "fixed")
    args = ["toptag", str(tmp_path / "in*.h5"), "--split-fractions", "0.7,0.2,0.1", "--chunk-size", "20",
            "--jets-per-shard", "30", "--interleave", "3", "--max-particles", "12", "--no-progress"]
    parser = add_convert_arguments(argparse.ArgumentParser())
    assert run_convert(parser.parse_args(args + ["--out", str(tmp_path / "whole")])) == 0

    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "jetfm.data.convert", *args, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "convert-progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if journal.exists() and len(json.loads(journal.read_text())["shards"]) >= 5:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM, child.stderr.read().decode()  # stopped mid-way, not finished
    child.stderr.close()
    assert not (out / "manifest.json").exists()
    finished = json.loads(journal.read_text())["shards"]
    assert 5 <= len(finished) < len(list((tmp_path / "whole").glob("*/shard-*.tar")))
    kept = {path: (out / path).stat().st_mtime_ns for path in finished}

    # other settings are refused, naming what differs and the flag that starts over
    with pytest.raises(DataError, match=r"interrupted conversion.*jets_per_shard.*--restart"):
        run_convert(parser.parse_args([("40" if a == "30" else a) for a in args] + ["--out", str(out)]))

    assert run_convert(parser.parse_args(args + ["--out", str(out)])) == 0  # the same command continues
    assert not journal.exists()
    assert {path: (out / path).stat().st_mtime_ns for path in finished} == kept  # finished shards not rewritten
    whole, resumed = _shard_jets(tmp_path / "whole"), _shard_jets(out)
    assert sorted(whole) == sorted(resumed)
    for path, (record, jets) in whole.items():
        assert resumed[path][0] == record  # counts and statistics
        for name in ("part", "offsets", "jet", "label"):
            np.testing.assert_array_equal(getattr(resumed[path][1], name), getattr(jets, name))


def test_restart_discards_an_interrupted_conversion(tmp_path):
    rng = np.random.default_rng(20)
    for k in range(2):
        write_toptag(tmp_path / f"in{k}.h5", toptag_truth(rng, 50), "fixed")
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-000000.tar").write_bytes(b"left by a stopped run")
    (out / "train" / "shard-000001.tar.tmp").write_bytes(b"half")
    (out / "convert-progress.json").write_text(json.dumps({"plan": {"first_index": {"train": 0}}, "shards": {
        "train/shard-000000.tar": {"path": "train/shard-000000.tar", "n_jets": 1}}}))
    args = ["toptag", str(tmp_path / "in*.h5"), "--jets-per-shard", "30", "--no-progress", "--out", str(out)]
    parser = add_convert_arguments(argparse.ArgumentParser())
    with pytest.raises(DataError, match="--restart"):
        run_convert(parser.parse_args(args))
    assert run_convert(parser.parse_args(args + ["--restart"])) == 0
    verify_shards(out, Manifest.load(out))
    assert Manifest.load(out).n_jets("train") == 100
    assert not (out / "convert-progress.json").exists() and not list(out.glob("*/*.tmp"))
