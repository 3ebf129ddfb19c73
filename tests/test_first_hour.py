"""What a new user meets first: config names as typed, the long-run warning, shard-vs-process
diagnosis, and scoring a classifier on a subset of its classes (JetClass-format files)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_convert import jetclass_truth, write_jetclass
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse fixture: fresh accelerate state, 1 thread

from jetfm import train as trainer
from jetfm.config import ConfigError
from jetfm.config_io import CONFIG_DIR, load_config
from jetfm.data.convert import JETCLASS_CLASSES, convert_jetclass
from jetfm.data.format import DataError
from jetfm.data.reader import make_loader
from jetfm.estimate import long_run_warning
from jetfm.finetune.evaluate import class_mapping, evaluate_classifier, predict
from jetfm.finetune.model import load_classifier


# --------------------------------------------------------------------------- config names
@pytest.mark.parametrize("typed", ["joint.yaml", "joint", "configs/joint.yaml", "small/joint.yaml", "small/joint"])
def test_config_names_resolve_as_typed(typed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: only the configs/ lookup can find it
    cfg = load_config(typed if not typed.startswith("configs/") else CONFIG_DIR.parent / typed)
    assert cfg.stage == "pretrain" and cfg.objective.name == "joint"
    assert cfg.name == ("joint-small" if "small" in typed else "joint")


def test_a_missing_config_lists_the_ones_that_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"jont\.yaml: config file not found.*joint\.yaml.*small/joint\.yaml"):
        load_config("jont.yaml")
    assert trainer.main(["--config", "jont.yaml", "--dry-run"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_bad_override_is_blamed_on_the_override_not_the_file():
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps=abc': train.max_steps: expected an integer"):
        load_config("joint.yaml", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps=0': train.max_steps must be >= 1"):
        load_config("joint.yaml", ["train.max_steps=0"])


def test_every_reference_config_has_a_small_preset_that_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        small = CONFIG_DIR / "small" / path.name
        assert small.is_file(), f"{path.name} has no laptop preset in configs/small/"
        big, little = load_config(path), load_config(small)
        assert (little.stage, little.name) == (big.stage, f"{big.name}-small")
        assert little.train.max_steps <= 1000 < big.train.max_steps


# --------------------------------------------------------------------------- the long-run warning
def test_a_run_longer_than_a_day_names_the_small_preset():
    # configs/joint.yaml on a laptop: 1e6 steps at ~3 s
    warning = long_run_warning("joint", 3.0, 1_000_000)
    assert warning is not None and "35 days" in warning and "--config small/joint.yaml" in warning
    assert long_run_warning("joint", 3.0, 28_000) is None  # 23 h: no warning
    assert "lower train.max_steps" in long_run_warning("joint-small", 3.0, 1_000_000)
    assert "configs/small/" in long_run_warning("my-experiment", 1.0, 10**6)


def test_the_trainer_warns_after_its_first_step_and_an_early_stop_reports_no_nan(tmp_path, pythia_toptag):
    """A real tokenizer run of 10^9 steps, stopped by SIGINT before its first log step: the
    warning follows the first step, and the summary's train loss says why it is missing."""
    import subprocess
    import sys

    cfg = {"stage": "tokenizer", "name": "tokenizer", "out_dir": str(tmp_path / "run"),
           "data": {"path": str(pythia_toptag), "batch_size": 16, "shuffle_buffer": 100},
           "tokenizer": {"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                         "codebook_size": 16},
           "train": {"max_steps": 10**9, "log_every": 10**8, "eval_every": 0, "checkpoint_every": 0,
                     "progress_bar": False},
           "tracking": {"enabled": False}}
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = ("import sys, threading, os, signal; from jetfm import train; "
            "threading.Timer(12, lambda: os.kill(os.getpid(), signal.SIGINT)).start(); "
            f"sys.exit(train.main(['--config', {str(path)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "warning: 999,999,99" in run.stderr and "--config small/tokenizer.yaml" in run.stderr, run.stderr
    assert "status      interrupted" in run.stderr and "train loss  - (before the first log step)" in run.stderr


# --------------------------------------------------------------------------- shards vs processes
def test_too_few_chunks_for_the_processes_is_named(tmp_path, pythia_toptag):
    cfg = load_config(None, ["stage=tokenizer", f"data.path={pythia_toptag}", "data.batch_size=1"])
    # chunks no longer bound the process count (streams share chunks by jet ranges); data.streams does
    with pytest.raises(ValueError, match="64 processes cannot share data.streams=8 evenly"):
        make_loader(cfg.data, "val", rank=0, world_size=64, seed=0, drop_uneven=True)
    cfg.data.streams = 64
    assert make_loader(cfg.data, "val", rank=63, world_size=64, seed=0, drop_uneven=True).batches_per_epoch() > 0
    cfg.data.batch_size = 10_000
    loader = make_loader(cfg.data, "val", rank=0, world_size=1, seed=0, drop_uneven=True)
    assert loader.batches_per_epoch() == 0
    assert ("fewer than one global batch of 10000 (data.batch_size 10000 x 1 process(es) x 1 accumulation); "
            "lower data.batch_size") in loader.dataset.shortfall()


# --------------------------------------------------------------------------- subset evaluation
def test_class_mapping_matches_names_and_refuses_unknown_jets():
    classes = list(JETCLASS_CLASSES)
    counts = [50 if c in ("QCD", "Tbqq") else 0 for c in classes]
    label_map, scored = class_mapping(classes, counts, ["QCD", "Tbqq"])
    assert scored == [0, 1] and label_map[0] == 0 and label_map[8] == 1 and label_map[1] == -1
    with pytest.raises(ValueError, match=r"'Hbb' \(5 jets\) is not a class of the classifier.*--class-map Hbb="):
        class_mapping(classes, [5 if c == "Hbb" else n for c, n in zip(classes, counts)], ["QCD", "Tbqq"])
    assert class_mapping(["light", "top"], [3, 4], ["QCD", "Tbqq"], {"light": "QCD", "top": "Tbqq"})[0] == [0, 1]
    with pytest.raises(ValueError, match=r"no jets of \['Hbb'\]"):
        class_mapping(classes, counts, classes, only=["QCD", "Hbb"])


def test_a_ten_class_model_is_scored_on_the_classes_present(tmp_path):
    """A JetClass-format model evaluated on files of two processes (TTBar + ZJetsToNuNu): the
    conversion declares all ten classes; accuracy and AUC are over QCD vs Tbqq, probabilities
    renormalised over the two, and equal scikit-learn's on the same predictions."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    write_jetclass(tmp_path / "mix.root", jetclass_truth(rng, 300))
    convert_jetclass(str(tmp_path / "mix.root"), tmp_path / "all", split="train", chunk_size=50, progress=False)
    truth = jetclass_truth(rng, 120, first_id=1000)
    truth["label"] = np.where(rng.random(120) < 0.5, 0, 8)  # QCD and Tbqq only
    write_jetclass(tmp_path / "pair.root", truth)
    convert_jetclass(str(tmp_path / "pair.root"), tmp_path / "pair", split="test", chunk_size=50, progress=False)

    cfg = {"stage": "finetune", "name": "ten", "out_dir": str(tmp_path / "ten"),
           "data": {"path": str(tmp_path / "all"), "batch_size": 32, "shuffle_buffer": 100, "inputs": "raw"},
           "model": {"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
           "finetune": {"mode": "scratch", "pretrained": None, "head_dim": 16, "head_heads": 2, "head_blocks": 1},
           "train": {"max_steps": 3, "eval_every": 0, "checkpoint_every": 0, "progress_bar": False},
           "tracking": {"enabled": False}}
    (tmp_path / "ten.yaml").write_text(yaml.safe_dump(cfg))
    assert trainer.main(["--config", str(tmp_path / "ten.yaml")]) == 0

    record = evaluate_classifier(tmp_path / "ten" / "final", tmp_path / "pair", split="test", out=tmp_path / "eval",
                                 progress=False, mlflow=False)
    assert record["scored_classes"] == ["QCD", "Tbqq"] and record["model_classes"] == list(JETCLASS_CLASSES)
    assert record["n_jets"] == 120 and record["signal_class"] == "Tbqq" and "scored on 2 classes" in record["text"]

    model, run_cfg, _ = load_classifier(tmp_path / "ten" / "final")
    run_cfg.data.path = str(tmp_path / "pair")
    full = predict(model, make_loader(run_cfg.data, "test", shuffle=False))
    pair = full["probs"][:, [0, 8]]
    pair /= pair.sum(1, keepdims=True)
    labels = (full["labels"] == 8).astype(int)
    assert record["accuracy"] == pytest.approx(np.mean(pair.argmax(1) == labels))
    assert record["auc"] == pytest.approx(roc_auc_score(labels, pair[:, 1]), abs=1e-9)

    with pytest.raises(DataError, match=r"classes differ.*no jets of \['Hbb'\]"):
        evaluate_classifier(tmp_path / "ten" / "final", tmp_path / "pair", split="test", classes_only=["QCD", "Hbb"],
                            progress=False, mlflow=False)
