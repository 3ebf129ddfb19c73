"""`jetfm data inspect`: the summary names every class and split, the figures are written."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from jetfm.data.convert import JETCLASS_CLASSES, convert_toptag
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, DataError, JetArrays
from jetfm.data.inspect import add_inspect_arguments, inspect_dataset, run_inspect, sample_split
from jetfm.data.shards import Manifest, ShardWriter, creation_info


def jetclass_like_dataset(root, jets_per_class=30, shards=2):
    """A shard set with the ten JetClass classes, class k having jet mass ~ 20 + 10 k GeV."""
    rng = np.random.default_rng(0)
    classes = list(JETCLASS_CLASSES)
    manifest = Manifest(source={"kind": "jetclass", "files": ["a.root"]}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=classes, chunk_size=16, max_particles=12,
                        created_by=creation_info())
    manifest.add_skipped({"nonfinite": 2, "label": 1})
    for split, n_per_class in (("train", jets_per_class), ("val", jets_per_class // 3)):
        label = np.repeat(np.arange(len(classes)), n_per_class)
        rng.shuffle(label)
        n = len(label)
        mult = rng.integers(1, 13, n)
        offsets = np.concatenate([[0], np.cumsum(mult)]).astype(np.int64)
        part = np.abs(rng.normal(10, 3, (offsets[-1], 4))).astype(np.float32)
        part[:, 3] += 20
        jet = np.stack([rng.uniform(500, 1000, n), rng.normal(0, 1, n), rng.uniform(-3, 3, n),
                        rng.uniform(600, 1200, n), 20 + 10 * label + rng.normal(0, 2, n), mult], 1)
        jets = JetArrays(part, offsets, jet.astype(np.float32), label)
        bounds = np.linspace(0, n, shards + 1).astype(int)
        for k in range(shards):
            writer = ShardWriter(root, f"{split}/shard-{k:06d}.tar", manifest.particle_features,
                                 manifest.jet_features, len(classes), chunk_size=16)
            writer.write(jets.select(np.arange(bounds[k], bounds[k + 1])))
            manifest.add_shard(split, writer.close())
    manifest.save(root)
    return manifest


def test_inspect_summary_and_figures(tmp_path, capsys):
    jetclass_like_dataset(tmp_path / "data")
    info = inspect_dataset(tmp_path / "data", verify=True)
    printed = capsys.readouterr().out
    for name in JETCLASS_CLASSES:
        assert name in printed
    assert "train" in printed and "val" in printed
    assert "nonfinite 2" in printed and "label 1" in printed  # skipped jets
    assert "Created by:" in printed and "Verified" in printed
    assert "jet_mass" in printed and "GeV" in printed  # feature ranges with units
    assert info["splits"]["train"]["n_jets"] == 300 and info["splits"]["val"]["n_jets"] == 100
    assert info["splits"]["train"]["class_counts"] == {name: 30 for name in JETCLASS_CLASSES}
    assert 1 <= info["splits"]["train"]["multiplicity"]["min"] <= info["splits"]["train"]["multiplicity"]["max"] <= 12
    out = tmp_path / "data" / "inspect"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["jet_mass.png", "jet_nparticles.png", "jet_pt.png"]
    assert all((out / n).stat().st_size > 10_000 for n in names)
    assert (out / "summary.txt").read_text().strip() == info["summary"]
    assert json.loads((out / "summary.json").read_text())["classes"] == list(JETCLASS_CLASSES)


def test_inspect_sample_spans_every_shard(tmp_path):
    manifest = jetclass_like_dataset(tmp_path / "data", jets_per_class=40, shards=4)
    sample = sample_split(tmp_path / "data", manifest, "train", max_jets=60)
    # 4 shards of 100 jets in chunks of 16: 16 jets (one chunk) from each
    assert len(sample) == 64
    assert set(np.unique(sample.label)) == set(range(10))


def test_inspect_after_convert_via_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    n, slots = 40, 6
    columns = {}
    for i in range(slots):
        pt = rng.uniform(5, 50, n)
        columns |= {f"E_{i}": pt * 1.1, f"PX_{i}": pt * 0.6, f"PY_{i}": pt * 0.8, f"PZ_{i}": pt * 0.45}
    columns["is_signal_new"] = rng.integers(0, 2, n)
    columns["E_0"][3] = np.nan
    pd.DataFrame(columns).to_hdf(tmp_path / "train.h5", key="table", format="fixed")
    convert_toptag(str(tmp_path / "train.h5"), tmp_path / "data", skip_bad=True, split=None,
                   split_fractions="0.5,0.5,0", progress=False)
    args = add_inspect_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "data"), "--out", str(tmp_path / "figs"), "--max-jets", "10"])
    assert run_inspect(args) == 0
    printed = capsys.readouterr().out
    assert "QCD" in printed and "Tbqq" in printed and "nonfinite 1" in printed
    assert len(list((tmp_path / "figs").glob("*.png"))) == 3
    with pytest.raises(DataError, match="not in the dataset"):
        inspect_dataset(tmp_path / "data", splits=["test"], echo=False)
    with pytest.raises(DataError, match="no manifest"):
        inspect_dataset(tmp_path / "nothing", echo=False)
