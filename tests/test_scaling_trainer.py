"""Compute accounting in the trainer: summary.json's scaling block, the FLOPs counter against the
analytic formula over the very batches trained on, resume continuing the sums, per-objective
validation losses for joint, MLflow params and metrics."""

import itertools
import json

import pytest
from accelerate.state import AcceleratorState, GradientState

from jetfm import train as trainer
from jetfm.config_io import load_config
from jetfm.data.reader import make_loader
from jetfm.data.shards import Manifest
from jetfm.models.pretrain import build_pretrain_model
from jetfm.scaling.flops import ModelShapes, step_flops
from jetfm.scaling.ladder import model_parameters


def reset():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tiny tokenized shard set (tokenizer 2 steps -> tokenize), shared by the module's runs."""
    from test_trainer import tiny_config, write_tiny_dataset

    from jetfm.tokenizer.tokenize import main as tokenize_main

    tmp = tmp_path_factory.mktemp("tokens")
    data = write_tiny_dataset(tmp / "data")
    reset()
    tok = tiny_config(tmp, data, name="tok", builder=None, stage="tokenizer",
                      tokenizer={"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                                 "latent_dim": 4, "codebook_size": 16},
                      train={"max_steps": 2, "eval_every": 0})
    assert trainer.main(["--config", str(tok)]) == 0
    reset()
    assert tokenize_main(["--tokenizer", str(tmp / "tok" / "final"), "--data", str(data),
                          "--out", str(tmp / "tokens"), "--splits", "train,val"]) == 0
    return tmp / "tokens"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module, created up front: its schema migrations take tens of
    seconds on a loaded machine, longer than a run's close waits for its tracker."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


def joint_config(tmp_path, tokens, name, uri, **train):
    from test_trainer import tiny_config
    return tiny_config(tmp_path, tokens, name=name, builder=None, objective={"name": "joint"},
                       model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
                       data={"path": str(tokens), "batch_size": 8, "shuffle_buffer": 8, "train_jets": 48},
                       train={"max_steps": 4, "eval_every": 4, "eval_batches": 1, "log_every": 1, **train},
                       tracking={"enabled": True, "uri": uri, "tags": {"jetfm.size": "xs"}})


@pytest.mark.slow  # ~70 s on a loaded 2-core machine (tokenizer, 3 runs)
def test_trainer_counts_the_analytic_flops_and_resume_continues_them(tmp_path, tokens, store):
    path = joint_config(tmp_path, tokens, "whole", store)
    reset()
    assert trainer.main(["--config", str(path)]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())

    # the analytic formula over the same batches: the loader in the trainer's order (seed, rank 0 of 1)
    cfg = load_config(path)
    loader = make_loader(cfg.data, cfg.data.train_split, seed=cfg.seed, shuffle=True, drop_uneven=True,
                         require_tokens=True)
    model = build_pretrain_model(cfg, Manifest.load(tokens))
    shapes = ModelShapes.from_model(model)
    batches = list(itertools.islice(_cycle(loader), 4))
    flops = sum(step_flops(shapes, b.seqlens, objective="joint", mask_fraction=cfg.objective.mask_fraction).total
                for b in batches)
    scaling = whole["scaling"]
    assert scaling["flops"] == pytest.approx(flops, rel=1e-12)
    assert scaling["jets_seen"] == 32 and scaling["particles_seen"] == sum(b.num_particles for b in batches)
    assert scaling["unique_jets"] == 48 and scaling["epochs"] == pytest.approx(32 / 48)
    assert (scaling["N"], scaling["N_total"]) == model_parameters(model) and scaling["size"] == "xs"
    assert {"loss", "ntp_loss", "mpm_loss"} <= set(whole["val"])

    # interrupted at step 2 (checkpoint), resumed: the same sums
    path = joint_config(tmp_path, tokens, "parts", store, checkpoint_every=2)
    reset()
    assert trainer.main(["--config", str(path), "train.max_steps=2"]) == 0
    reset()
    assert trainer.main(["--config", str(path), "--resume", "auto"]) == 0
    parts = json.loads((tmp_path / "parts" / "summary.json").read_text())["scaling"]
    for key in ("flops", "particles_seen", "jets_seen", "epochs", "steps"):
        assert parts[key] == pytest.approx(scaling[key], rel=1e-12), key

    # MLflow: static numbers as params, cumulative ones as metrics
    import mlflow
    client = mlflow.MlflowClient(store)
    run = client.get_run(whole["mlflow"]["run_id"])
    assert run.data.params["scaling.N"] == str(scaling["N"]) and run.data.params["scaling.unique_jets"] == "48"
    assert run.data.metrics["compute/flops"] == pytest.approx(flops, rel=1e-6)
    assert run.data.metrics["val/mpm_loss"] == pytest.approx(whole["val"]["mpm_loss"], rel=1e-6)


def _cycle(loader):
    while True:
        yield from loader
