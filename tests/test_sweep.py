"""The data-efficiency sweep: training subsets, the grid, a tiny end-to-end study, resuming."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
from test_finetune import TINY_HEAD, TINY_MODEL, chain, write_config  # noqa: F401 - fixture
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse fixture

from jetfm.data.reader import iterate_jets
from jetfm.data.shards import Manifest
from jetfm.sweep import add_sweep_arguments, parse_pretrained, run_sweep, stratified_choice, write_train_subset


def test_stratified_choice_is_balanced_nested_and_seeded():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    small, large = stratified_choice(labels, 100, seed=3), stratified_choice(labels, 400, seed=3)
    assert np.bincount(labels[small]).tolist() == [60, 30, 10]
    assert np.bincount(labels[large]).tolist() == [240, 120, 40]
    assert len(set(small)) == 100 and set(small) <= set(large)  # nested: 100 jets are among the 400
    assert np.array_equal(small, stratified_choice(labels, 100, seed=3))
    assert not np.array_equal(np.sort(small), np.sort(stratified_choice(labels, 100, seed=4)))
    assert np.bincount(labels[stratified_choice(labels, 5, seed=0)], minlength=3).min() >= 1  # every class


def test_train_subset_shards(tmp_path, pythia_toptag):
    subset = write_train_subset(pythia_toptag, tmp_path / "n50", 50, seed=0)
    manifest, source = Manifest.load(subset), Manifest.load(pythia_toptag)
    assert manifest.n_jets("train") == 50 and manifest.class_counts("train") == [25, 25]
    assert manifest.n_jets("test") == source.n_jets("test") and (subset / manifest.shards("test")[0]["path"]).is_symlink()
    jets = next(iterate_jets(subset, "train"))
    all_train = [j for j in iterate_jets(pythia_toptag, "train")]
    pts = {round(float(j.jet[i, 0]), 3) for j in all_train for i in range(len(j))}
    assert all(round(float(pt), 3) in pts for pt in jets.jet[:, 0])  # real jets of the training split
    assert write_train_subset(pythia_toptag, tmp_path / "n50", 50, seed=0) == subset  # reused
    with pytest.raises(Exception, match="another subset"):
        write_train_subset(pythia_toptag, tmp_path / "n50", 60, seed=0)


def test_pretrained_argument():
    assert parse_pretrained("none=,ntp=runs/ntp-{input}/final") == {"none": None, "ntp": "runs/ntp-{input}/final"}
    for bad in ("ntp", "none=runs/x", "ntp=", "a=x,a=y"):
        with pytest.raises(ValueError):
            parse_pretrained(bad)


def sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    return run_sweep(parser.parse_args(argv))


def test_tiny_study_end_to_end_and_resumable(tmp_path, chain, capsys):
    """2 sizes x {scratch, joint-pretrained}: every run trained, evaluated on test, tabulated, plotted, tracked."""
    from mlflow.tracking import MlflowClient

    base = write_config(tmp_path / "base.yaml", data={"path": str(chain["tokens"]), "batch_size": 32},
                        model=dict(TINY_MODEL, dim=32), finetune=dict(TINY_HEAD, mode="full", pretrained="runs/x"),
                        train={"max_steps": 8, "eval_batches": 2, "log_every": 4, "checkpoint_every": 0,
                               "progress_bar": False},
                        tracking={"enabled": True})
    out = tmp_path / "study"
    argv = ["finetune", "--base", str(base), "--out", str(out), "--train-sizes", "40,100",
            "--pretrained", f"none=,joint={chain['pretrained']}", "--inputs", "continuous", "--modes", "full",
            "--evals", "2", "--no-progress", "--set", "optim.lr=2e-3"]
    assert sweep(argv) == 0
    with open(out / "study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["train_size"], r["pretrained"], r["mode"]) for r in rows) == [
        ("100", "joint", "full"), ("100", "none", "scratch"), ("40", "joint", "full"), ("40", "none", "scratch")]
    for row in rows:
        assert row["n_test"] == "200" and 0 <= float(row["accuracy"]) <= 1 and 0 <= float(row["auc"]) <= 1
        assert row["objective"] in ("joint", "")
    table = (out / "study.md").read_text()
    assert "| joint continuous full |" in table and "| scratch continuous |" in table and "N = 40" in table
    for name in ("accuracy.png", "rejection30.png"):
        assert (out / name).stat().st_size > 10_000

    # each run trained on its own N jets and was configured as the grid says
    run = out / "runs" / "n40-none-continuous-scratch-s0"
    used = json.loads((run / "summary.json").read_text())
    assert Manifest.load(out / "data" / "train-40").n_jets("train") == 40
    assert used["steps"] == 8 and used["best"]["step"] in (4, 8)
    scratch = (run / "sweep_config.yaml").read_text()
    assert "dim: 16" in scratch  # scratch runs take the pre-trained backbone's size, not the base's 32
    result = json.loads((run / "result.json").read_text())
    assert result["evaluated"].endswith("best")

    # one MLflow experiment, the grid values as tags, test metrics in every run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jetfm-study-study")
    runs = client.search_runs([experiment.experiment_id], "tags.`study.mode` = 'full'")
    assert sorted(r.data.tags["study.train_size"] for r in runs) == ["100", "40"]
    assert all("test/auc" in r.data.metrics and r.data.tags["study.pretrained"] == "joint" for r in runs)

    # rerun: nothing is trained again
    capsys.readouterr()
    mtime = (run / "result.json").stat().st_mtime
    assert sweep(argv) == 0
    assert capsys.readouterr().err.count("done before, skipped") == 4
    assert (run / "result.json").stat().st_mtime == mtime


def test_bad_grid_fails_before_training(tmp_path, chain, capsys):
    base = write_config(tmp_path / "base.yaml", data={"path": str(chain["tokens"])})
    argv = ["finetune", "--base", str(base), "--out", str(tmp_path / "s"), "--train-sizes", "10",
            "--pretrained", f"ntp={tmp_path}/nothing-{{input}}"]
    assert sweep(argv) == 2
    assert "expected a pre-training run's out_dir/final" in capsys.readouterr().err
    argv[-1] = f"joint={chain['pretrained']}"  # a continuous-input checkpoint
    assert sweep(argv + ["--inputs", "token"]) == 2
    assert "input_mode=continuous, not in --inputs" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
