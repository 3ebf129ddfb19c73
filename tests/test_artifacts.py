"""jetfm.artifacts and the shared pieces it gathered: atomic publishing (with a real SIGKILL),
stage exports and their versions, run lookup + post-hoc logging on a real MLflow store, the
shard-set writer, and the one feature transform for numpy and torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jetfm.artifacts.atomic import atomic_directory, atomic_write_text, recover_directory
from jetfm.artifacts.exports import (
    ExportError,
    checkpoint_vocab,
    export_model,
    export_stage,
    load_pretrain,
    read_pretrain,
    weights_metadata,
)
from jetfm.artifacts.runs import find_run_record, log_to_run, open_run, recorded_step
from jetfm.config_io import load_config
from jetfm.data.features import FeatureTransform, Preprocessing, feature_spec, same_features
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES, JetArrays
from jetfm.data.reader import iterate_jets
from jetfm.data.shards import Manifest, ShardSetWriter
from jetfm.models.pretrain import PretrainModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stage=pretrain", "model.dim=16", "model.num_heads=2", "model.num_blocks=1", "model.dropout=0.0"]


def tiny_pretrain(overrides=(), vocab=10):
    cfg = load_config(None, [*TINY, *overrides])
    model = PretrainModel(cfg.model, cfg.objective, vocab_size=vocab, num_features=len(cfg.data.features),
                          inputs=cfg.data.inputs)
    return cfg, model


# --------------------------------------------------------------------------- atomic
def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("export failed half-way")
    assert (target / "a.txt").read_text() == "old"  # the failed export changed nothing
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp or .old left behind
    atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}" and not (tmp_path / "x.json.tmp").exists()


def test_interrupted_fallback_publish_is_recovered(tmp_path):
    """The two-rename fallback: a process dead between the renames left only `<name>.old`."""
    (tmp_path / "final.old").mkdir()
    (tmp_path / "final.old" / "model.txt").write_text("previous")
    recover_directory(tmp_path / "final")
    assert (tmp_path / "final" / "model.txt").read_text() == "previous"


_EXPORT_LOOP = textwrap.dedent("""
    import os, signal, sys, torch
    import jetfm.artifacts.atomic as atomic
    from jetfm.artifacts.exports import export_model
    from jetfm.config_io import load_config

    def die_at(point):  # SIGKILL this process in export number `kill_at`, before or after atomic.<name>
        name, _, when = point.partition(":")
        original = getattr(atomic, name)
        def wrapper(*args, **kwargs):
            if i == kill_at and when != "after":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(atomic, name, wrapper)

    cfg = load_config(None, ["stage=pretrain"])
    module = torch.nn.Linear(1024, 1024)   # 4 MiB of weights: a random kill lands inside a write
    out, point, kill_at, i = sys.argv[1], sys.argv[2], int(sys.argv[3]), 0
    if point != "random":
        die_at(point)
    while True:
        i += 1
        with torch.no_grad():
            module.weight.fill_(float(i))
            module.bias.fill_(float(i))
        export_model(module, cfg, out)
        print(i, flush=True)
""")


def _check_whole(final: Path) -> float | None:
    """None when there is no export; else the one value of its weights (after checking it is whole)."""
    recover_directory(final)
    if not final.exists():
        return None
    from safetensors.torch import load_file

    assert sorted(p.name for p in final.iterdir()) == ["config.yaml", "model.safetensors"]
    assert load_config(final / "config.yaml").stage == "pretrain"
    state = load_file(str(final / "model.safetensors"))
    values = {float(state["weight"][0, 0]), float(state["weight"][-1, -1]), float(state["bias"][-1])}
    assert len(values) == 1, f"weights of two exports mixed: {values}"
    return values.pop()


def _export_loop(final: Path, point: str = "random", kill_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _EXPORT_LOOP, str(final), point, str(kill_at)], env=env,
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["fsync_tree", "replace_directory", "_exchange:after"])
def test_sigkill_at_the_publish_steps_of_pretrain_export(tmp_path, point):
    """SIGKILL of the exporting process (real, deterministic) while export 2 replaces export 1:
    before its files are synced, just before it is published, and right after the swap (the old
    export not yet removed): final/ is export 1 or export 2, whole."""
    final = tmp_path / "run" / "final"
    proc = _export_loop(final, point, kill_at=2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and out.split() == ["1"]
    assert _check_whole(final) == (2.0 if point.endswith(":after") else 1.0)
    cfg, model = tiny_pretrain()
    export_model(model, cfg, final)  # the next export publishes and clears what the killed one left
    assert read_pretrain(final).vocab_size == 10
    assert [p.name for p in final.parent.iterdir()] == ["final"]


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_at_random_instants_of_pretrain_export(tmp_path, previous):
    """A real SIGKILL at random instants of a pre-training export: final/ is the previous export
    (or none before the first one), never half of one."""
    rng = np.random.default_rng(7)
    for trial in range(4):
        final = tmp_path / f"run{trial}" / "final"
        proc = _export_loop(final)
        try:
            if previous:
                assert proc.stdout.readline().strip() == "1"  # one export complete, the next under way
                time.sleep(float(rng.uniform(0.0, 0.15)))
            else:
                while not final.parent.exists():  # killed during the very first export
                    time.sleep(0.001)
                time.sleep(float(rng.uniform(0.0, 0.02)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        value = _check_whole(final)
        if previous:
            assert value is not None and value >= 1.0
        assert value is None or value == int(value)


# --------------------------------------------------------------------------- exports
def test_pretrain_export_round_trip_and_versions(tmp_path):
    cfg, model = tiny_pretrain()
    export_model(model, cfg, tmp_path / "run" / "final")
    meta = weights_metadata(tmp_path / "run" / "final" / "model.safetensors")
    assert meta["stage"] == "pretrain" and meta["format_version"] == "1"
    export = read_pretrain(tmp_path / "run")  # a run directory means its final/
    assert export.directory == tmp_path / "run" / "final"
    assert export.vocab_size == checkpoint_vocab(export.state) == 10 and export.num_features == 3
    assert export.num_classes == 0 and export.format_version == 1
    _, loaded, _ = load_pretrain(tmp_path / "run")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.model_cfg.attention == "auto" and not loaded.training

    # an export from before versioning (no format_version) still reads; a newer format is refused
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp_path / "run" / "final" / "model.safetensors"), metadata={"format": "jetfm", "stage": "pretrain"})
    assert read_pretrain(tmp_path / "run").format_version == 1
    save_file(weights, str(tmp_path / "run" / "final" / "model.safetensors"), metadata={"format_version": "99"})
    with pytest.raises(ExportError, match="format_version 99"):
        read_pretrain(tmp_path / "run")

    # not an export, another stage
    with pytest.raises(ExportError, match="not a pre-training export"):
        read_pretrain(tmp_path)
    tok_cfg = load_config(None, ["stage=tokenizer"])
    export_model(torch.nn.Linear(2, 2), tok_cfg, tmp_path / "tok")
    with pytest.raises(ExportError, match="a 'tokenizer' checkpoint"):
        read_pretrain(tmp_path / "tok")
    with pytest.raises(ExportError, match="missing: no such directory"):
        read_pretrain(tmp_path / "missing")


def test_export_stage_publishes_exporter_output_and_note_together(tmp_path):
    cfg, model = tiny_pretrain()
    calls = []

    def exporter(module, directory):
        calls.append(Path(directory))
        export_model(module, cfg, directory)

    export_stage(exporter, model, cfg, tmp_path / "best", {"step": 12, "metric": "val/loss"})
    assert calls and calls[0] != tmp_path / "best"  # written elsewhere, then published
    assert json.loads((tmp_path / "best" / "selection.json").read_text())["step"] == 12
    assert read_pretrain(tmp_path / "best").vocab_size == 10
    export_stage(None, model, cfg, tmp_path / "best")  # a re-export without a note replaces it whole
    assert not (tmp_path / "best" / "selection.json").exists()


def test_classifier_reader_checks_format_and_version(tmp_path):
    from types import SimpleNamespace

    from jetfm.artifacts.exports import export_classifier, read_classifier

    cfg = load_config(None, ["stage=finetune"])
    module = torch.nn.Linear(3, 2)
    classifier = SimpleNamespace(state_dict=module.state_dict, run_config=cfg, classes=["QCD", "Tbqq"],
                                 meta={"format": "jetfm-classifier", "num_features": 3})
    export_classifier(classifier, tmp_path / "best")
    read_cfg, state, meta = read_classifier(tmp_path / "best")
    assert read_cfg.stage == "finetune" and meta["format_version"] == 1 and meta["classes"] == ["QCD", "Tbqq"]
    assert torch.equal(state["weight"], module.weight.detach())
    meta_path = tmp_path / "best" / "classifier.json"
    del meta["format_version"]  # written before versioning: version 1
    meta_path.write_text(json.dumps(meta))
    assert read_classifier(tmp_path / "best")[2]["classes"] == ["QCD", "Tbqq"]
    meta_path.write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(ExportError, match="format_version 2; this jetfm reads up to 1"):
        read_classifier(tmp_path / "best")
    meta_path.write_text(json.dumps(dict(meta, format="jetfm")))
    with pytest.raises(ExportError, match="expected 'jetfm-classifier'"):
        read_classifier(tmp_path / "best")
    meta_path.unlink()
    with pytest.raises(ExportError, match="no classifier.json"):
        read_classifier(tmp_path / "best")


# --------------------------------------------------------------------------- runs
def test_run_lookup_and_post_hoc_logging_on_real_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, new = open_run(uri, None, experiment="jetfm-test", run_name="trained")
    assert new
    assert open_run(uri, run_id, experiment="jetfm-test", run_name="x") == (run_id, False)
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 40, "mlflow": {"uri": uri, "run_id": run_id}}))
    record = find_run_record(run_dir / "final")
    assert record["uri"] == uri and record["run_id"] == run_id and recorded_step(record) == 40
    assert find_run_record(tmp_path / "elsewhere") is None

    (run_dir / "eval.md").write_text("# eval\n")
    n = log_to_run(uri, run_id, {"test/auc": 0.9, "test/bad key!": 1.0, "test/nan": float("nan")}, step=40,
                   artifacts=[(run_dir / "eval.md", "eval/test")], tags={"jetfm.kind": "eval"})
    assert n == 2  # the NaN is left out
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"test/auc": 0.9, "test/bad key_": 1.0}
    assert client.get_metric_history(run_id, "test/auc")[0].step == 40
    assert run.data.tags["jetfm.kind"] == "eval"
    assert [a.path for a in client.list_artifacts(run_id, "eval/test")] == ["eval/test/eval.md"]


# --------------------------------------------------------------------------- shard-set writer
def _jets(n, start=0):
    mult = np.full(n, 3)
    offsets = np.concatenate([[0], np.cumsum(mult)]).astype(np.int64)
    part = np.ones((offsets[-1], 4), np.float32)
    jet = np.zeros((n, len(JET_FEATURES)), np.float32)
    jet[:, 0] = np.arange(start, start + n)  # an id per jet
    return JetArrays(part, offsets, jet, np.arange(start, start + n) % 2)


def _manifest():
    return Manifest(source={"kind": "test"}, particle_features=list(KINEMATIC_FEATURES),
                    jet_features=list(JET_FEATURES), classes=["a", "b"], chunk_size=4)


@pytest.mark.parametrize("save_each", [True, False])
def test_shard_set_writer_rolls_jets_into_fixed_size_shards(tmp_path, save_each):
    manifest = _manifest()
    writer = ShardSetWriter(tmp_path, "train", manifest, jets_per_shard=10, save_each=save_each)
    for start, n in ((0, 7), (7, 7), (14, 11)):  # batches that straddle shard boundaries
        writer.write(_jets(n, start))
    records = writer.finish()
    assert [r.n_jets for r in records] == [10, 10, 5]
    assert [r.path for r in records] == [f"train/shard-{i:06d}.tar" for i in range(3)]
    if not save_each:
        for record in records:
            manifest.add_shard("train", record)
        manifest.save(tmp_path)
    assert Manifest.load(tmp_path).n_jets("train") == 25
    ids = np.concatenate([j.jet[:, 0] for j in iterate_jets(tmp_path, "train")])
    np.testing.assert_array_equal(ids, np.arange(25))  # every jet once, in order


def test_shard_set_writer_abort_removes_its_shards(tmp_path):
    writer = ShardSetWriter(tmp_path, "train", _manifest(), jets_per_shard=10, first_index=3)
    writer.write(_jets(15))
    writer.abort()
    assert not list(tmp_path.glob("train/*"))


# --------------------------------------------------------------------------- features
def test_feature_transform_is_one_implementation_for_numpy_and_torch():
    x = np.array([1e-3, 0.7, 3.0, 250.0])
    for transform in (FeatureTransform("signed_log", 1.8, 1.0), FeatureTransform("log", 0.5, 2.0),
                      FeatureTransform("none", 0.0, 3.0)):
        y = transform.forward(x)
        y_t = transform.forward(torch.tensor(x))
        assert isinstance(y_t, torch.Tensor)
        np.testing.assert_allclose(y_t.numpy(), y, rtol=1e-12)
        np.testing.assert_allclose(transform.inverse(torch.tensor(y)).numpy(), x, rtol=1e-9)
        np.testing.assert_allclose(transform.inverse(y), x, rtol=1e-9)
    assert FeatureTransform("log", 0.5, 2.0).forward(np.array([-1.0]))[0] == pytest.approx((np.log(1e-30) - 0.5) * 2)


def test_one_feature_equality():
    reference = Preprocessing()
    as_config = {"part_pt": {"function": "signed_log", "subtract": 1.8}, "part_etarel": {"multiply": 3.0},
                 "part_phirel": {"multiply": 3.0 + 1e-13}}
    assert same_features(reference, as_config) and same_features(None, reference)
    assert not same_features(reference, {**as_config, "part_phirel": {"multiply": 3.01}})
    assert not same_features(reference, dict(reversed(list(as_config.items()))))  # order matters
    assert feature_spec(as_config)["part_etarel"] == {"function": "none", "subtract": 0.0, "multiply": 3.0}
    with pytest.raises(ValueError, match="unknown"):
        feature_spec({"part_pt": {"function": "sqrt"}})
