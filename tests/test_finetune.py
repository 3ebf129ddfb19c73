"""Fine-tuning: a class-attention classifier on real Pythia top-vs-QCD jets, through the real trainer.

The pre-trained backbone comes from the real chain (tokenizer -> `jetfm data tokenize` -> joint
pre-training), tiny, built once per session by `pretrained_chain` (shared with test_sweep.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse fixture: fresh accelerate state, 1 thread

from jetfm import train as trainer
from jetfm.config import ConfigError
from jetfm.config_io import load_config
from jetfm.data.format import DataError
from jetfm.data.reader import make_loader
from jetfm.data.shards import Manifest
from jetfm.finetune.evaluate import evaluate_classifier, predict
from jetfm.finetune.model import FinetuneModel, build_finetune_model, load_classifier, read_pretrained

TINY_MODEL = {"dim": 16, "num_heads": 2, "num_blocks": 2, "head_blocks": 1, "dropout": 0.0}
TINY_HEAD = {"head_dim": 16, "head_heads": 2, "head_blocks": 1}
QUIET = {"log_every": 5, "checkpoint_every": 0, "progress_bar": False}

_CHAIN: dict = {}


def build_chain(tmp_path_factory, raw_data: Path) -> dict:
    """tokenizer (20 steps) -> tokenize train/val/test (+ reco) -> joint pre-training (20 steps); once per session."""
    if _CHAIN:
        return _CHAIN
    from jetfm.tokenizer.tokenize import main as tokenize_main

    root = tmp_path_factory.mktemp("finetune-chain")
    tokenizer = write_config(root / "tok.yaml", stage="tokenizer", name="tok", out_dir=root / "tok",
                             data={"path": str(raw_data)},
                             tokenizer={"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                                        "latent_dim": 4, "codebook_size": 32, "dead_code_every": 5,
                                        "min_utilisation": 0.0},
                             train={"max_steps": 20, "eval_every": 0})
    assert trainer.main(["--config", str(tokenizer)]) == 0
    tokens = root / "tokens"
    assert tokenize_main(["--tokenizer", str(root / "tok" / "final"), "--data", str(raw_data), "--out", str(tokens),
                          "--with-reco", "--quiet"]) == 0
    pretrain = write_config(root / "pre.yaml", stage="pretrain", name="pre", out_dir=root / "pre",
                            data={"path": str(tokens)}, model=dict(TINY_MODEL, dropout=0.1),
                            objective={"name": "joint"}, train={"max_steps": 20, "eval_every": 0})
    assert trainer.main(["--config", str(pretrain)]) == 0
    _CHAIN.update(root=root, tokens=tokens, pretrained=root / "pre" / "final")
    return _CHAIN


@pytest.fixture
def chain(tmp_path_factory, pythia_toptag) -> dict:
    return build_chain(tmp_path_factory, pythia_toptag)


def write_config(path: Path, **sections) -> Path:
    """A YAML config: tiny batches, no tracking, quiet; `sections` extend/override it."""
    cfg = {
        "stage": "finetune", "name": path.stem, "seed": 0, "out_dir": str(path.with_suffix("")),
        "data": {"batch_size": 32, "shuffle_buffer": 400},
        "optim": {"lr": 3e-3, "weight_decay": 0.01},
        "train": {"max_steps": 4, "eval_every": 0, "eval_batches": 4, **QUIET},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = str(values) if isinstance(values, Path) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def finetune_config(tmp_path: Path, data_dir: Path, name: str, **sections) -> Path:
    """A tiny fine-tuning config on data_dir (model.* tiny unless `model` is given)."""
    sections.setdefault("model", dict(TINY_MODEL))
    sections["finetune"] = dict(TINY_HEAD, **sections.get("finetune", {}))
    sections["data"] = {"batch_size": 32, "shuffle_buffer": 400, "path": str(data_dir), **sections.get("data", {})}
    return write_config(tmp_path / f"{name}.yaml", **sections)


def backbone_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("backbone.") and k != "backbone.start"}


# --------------------------------------------------------------------------- learning + evaluation
def test_scratch_classifier_separates_top_from_qcd_and_evaluate_reports_it(tmp_path, pythia_toptag):
    """From scratch on real Pythia jets: > 80% accuracy and AUC > 0.85 on the test split; the
    evaluate command's numbers agree with scikit-learn and land in the run's MLflow run."""
    from mlflow.tracking import MlflowClient
    from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve

    config = finetune_config(tmp_path, pythia_toptag, "scratch",
                             model=dict(TINY_MODEL, dim=32, num_heads=4), finetune={"head_dim": 32, "head_heads": 4},
                             optim={"lr": 1e-3}, train={"max_steps": 150, "eval_every": 50, "eval_batches": 4, **QUIET},
                             tracking={"enabled": True, "experiment": "ft-test"})
    assert trainer.main(["--config", str(config)]) == 0
    run_dir = tmp_path / "scratch"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["metric"] == "auc" and summary["best"]["step"] in (50, 100, 150)
    assert json.loads((run_dir / "best" / "selection.json").read_text())["step"] == summary["best"]["step"]

    out = tmp_path / "eval"
    record = evaluate_classifier(run_dir / "best", pythia_toptag, split="test", out=out, progress=False)
    assert record["accuracy"] > 0.80 and record["auc"] > 0.85, record["text"]
    assert (out / "roc.png").stat().st_size > 10_000 and (out / "confusion.png").stat().st_size > 10_000
    written = json.loads((out / "metrics.json").read_text())
    assert written["n_jets"] == 200 and written["n_background"] == 100 and written["signal_class"] == "Tbqq"

    # scikit-learn on the same predictions
    model, cfg, _ = load_classifier(run_dir / "best")
    cfg.data.path = str(pythia_toptag)
    result = predict(model, make_loader(cfg.data, "test", shuffle=False))
    labels, score = result["labels"], result["probs"][:, 1]
    assert written["accuracy"] == pytest.approx(accuracy_score(labels, result["probs"].argmax(1)))
    assert written["auc"] == pytest.approx(roc_auc_score(labels, score), abs=1e-9)
    fpr, tpr, _ = roc_curve(labels, score, drop_intermediate=False)
    for eff in (0.3, 0.5):
        passing = written[f"rejection@{eff}_n_background_passing"]
        assert passing == round(fpr[np.argmax(tpr >= eff)] * 100)
        if passing:
            eps = passing / 100
            assert written[f"rejection@{eff}"] == pytest.approx(1 / eps)
            assert written[f"rejection@{eff}_unc"] == pytest.approx(np.sqrt(eps * (1 - eps) / 100) / eps**2)

    # logged to the run that trained it
    assert record["mlflow"]["run_id"] == summary["mlflow"]["run_id"]
    run = MlflowClient(summary["mlflow"]["uri"]).get_run(summary["mlflow"]["run_id"])
    assert run.data.metrics["test/auc"] == pytest.approx(written["auc"])
    assert run.data.metrics["test/accuracy"] == pytest.approx(written["accuracy"])
    assert "val/auc" in run.data.metrics


def test_evaluate_command_prints_a_table_and_rejects_other_classes(tmp_path, pythia_toptag, capsys):
    import argparse

    from jetfm.finetune.evaluate import add_classifier_arguments, run_classifier

    config = finetune_config(tmp_path, pythia_toptag, "cmd", train={"max_steps": 2, **QUIET})
    assert trainer.main(["--config", str(config)]) == 0
    parser = argparse.ArgumentParser()
    add_classifier_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "cmd" / "final"), "--data", str(pythia_toptag),
                              "--no-progress", "--no-mlflow"])
    assert run_classifier(args) == 0
    text = capsys.readouterr().out
    assert "1/eps_B at eps_S = 30%" in text and "| Tbqq | 100 |" in text and "background jets" in text
    assert (tmp_path / "cmd" / "eval" / "test_final" / "metrics.json").exists()

    # a data set with other classes: a clear error naming both
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((pythia_toptag / "manifest.json").read_text())
    manifest["classes"] = ["QCD", "Wqq"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"classes differ.*\['QCD', 'Tbqq'\].*\['QCD', 'Wqq'\]"):
        evaluate_classifier(tmp_path / "cmd" / "final", other, progress=False, mlflow=False)


# --------------------------------------------------------------------------- pre-trained backbones
def test_full_finetune_starts_from_the_pretrained_weights(tmp_path, chain):
    config = finetune_config(tmp_path, chain["tokens"], "full", model={"dropout": 0.1},
                             finetune={"mode": "full", "pretrained": str(chain["pretrained"]), "backbone_lr_scale": 0.5})
    cfg = load_config(config)
    model = build_finetune_model(cfg, Manifest.load(chain["tokens"]))
    _, state, _ = read_pretrained(chain["pretrained"])
    mine = model.state_dict()
    loaded = backbone_weights(state)
    assert "backbone.start" in state and "backbone.start" not in mine  # the NTP start vector is dropped
    assert len(loaded) == len([k for k in mine if k.startswith("backbone.")]) > 10
    for key, value in loaded.items():
        assert torch.equal(mine[key], value), key
    # the backbone architecture came from the checkpoint (the config left model.* at defaults)
    assert (cfg.model.dim, cfg.model.num_blocks, cfg.model.num_heads) == (16, 2, 2)
    assert cfg.model.dropout == 0.1  # not a backbone key: the fine-tune config's own
    assert model.meta["pretrained_objective"] == "joint"

    # the trainer uses the model's groups: head at optim.lr, backbone at backbone_lr_scale x optim.lr
    groups = model.param_groups(1e-3, 0.01)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone_ids for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == pytest.approx(5e-4 if in_backbone.pop() else 1e-3)


def test_frozen_mode_leaves_every_backbone_weight_bit_identical(tmp_path, chain):
    config = finetune_config(tmp_path, chain["tokens"], "frozen", model={"dropout": 0.2},
                             finetune={"mode": "frozen", "pretrained": str(chain["pretrained"])},
                             train={"max_steps": 6, **QUIET})
    assert trainer.main(["--config", str(config)]) == 0
    after = load_file(str(tmp_path / "frozen" / "final" / "model.safetensors"))
    _, before, _ = read_pretrained(chain["pretrained"])
    for key, value in backbone_weights(before).items():
        assert torch.equal(after[key], value), key
    # ... while the head trained, from its seeded initialisation
    cfg = load_config(config)
    torch.manual_seed(cfg.seed)
    initial = build_finetune_model(cfg, Manifest.load(chain["tokens"])).state_dict()
    assert not torch.equal(after["head.out.weight"], initial["head.out.weight"])
    # no dropout in a frozen backbone, whatever the trainer asks; nothing to optimise there
    model, _, _ = load_classifier(tmp_path / "frozen" / "final")
    model.train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert sum(len(g["params"]) for g in model.param_groups(1e-3, 0.0)) == len(list(model.head.parameters()))


def test_full_mode_trains_the_backbone_at_its_own_learning_rate(tmp_path, chain):
    """Through the trainer: backbone_lr_scale=1e-9 keeps the backbone all but still; 1 moves it."""
    _, before, _ = read_pretrained(chain["pretrained"])
    moved = {}
    for scale in (1e-9, 1.0):
        name = f"lr{scale:g}"
        config = finetune_config(tmp_path, chain["tokens"], name,
                                 finetune={"mode": "full", "pretrained": str(chain["pretrained"]),
                                           "backbone_lr_scale": scale}, train={"max_steps": 3, **QUIET})
        assert trainer.main(["--config", str(config)]) == 0
        after = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        moved[scale] = max(float((after[k] - v).abs().max()) for k, v in backbone_weights(before).items())
    assert moved[1e-9] < 1e-8 < 1e-4 < moved[1.0]


def test_no_particle_is_masked_and_attention_is_bidirectional(tmp_path, pythia_toptag, monkeypatch):
    import jetfm.models.objectives

    def no_masking(*args, **kwargs):
        raise AssertionError("fine-tuning must not mask particles")

    monkeypatch.setattr(jetfm.models.objectives, "mask_particles", no_masking)
    assert FinetuneModel.MASK_FRACTION == 0.0
    cfg = load_config(finetune_config(tmp_path, pythia_toptag, "nomask"))
    manifest = Manifest.load(pythia_toptag)
    model = build_finetune_model(cfg, manifest).train()  # training mode: where a masking bug would act
    batch = next(iter(make_loader(cfg.data, "val", shuffle=False)))
    with torch.no_grad():
        first, second = model.logits(batch), model.logits(batch)
        assert torch.equal(first, second)  # no random masking (dropout 0)
        z_TD, _ = model.encode(batch)
        x = batch.x.clone()
        last = int(batch.cu_seqlens[1]) - 1  # the softest particle of jet 0
        x[last] += 1.0
        batch.x = x
        z2_TD, _ = model.encode(batch)
        changed = model.logits(batch)
    assert int(batch.cu_seqlens[1]) > 2
    assert not torch.allclose(z_TD[0], z2_TD[0])  # the hardest particle sees the softest one: bidirectional
    assert not torch.allclose(changed[0], first[0])  # and the classifier does
    torch.testing.assert_close(changed[1:], first[1:])  # other jets are untouched


# --------------------------------------------------------------------------- errors
def test_checkpoint_and_data_mismatches_are_clear_errors(tmp_path, chain):
    manifest = Manifest.load(chain["tokens"])
    pretrained = str(chain["pretrained"])

    # features the backbone was not pre-trained on
    cfg = load_config(finetune_config(tmp_path, chain["tokens"], "features",
                                      finetune={"mode": "full", "pretrained": pretrained},
                                      data={"features": {"part_pt": {"function": "signed_log", "subtract": 1.8},
                                                         "part_etarel": {"multiply": 2.0},
                                                         "part_phirel": {"multiply": 3.0}}}))
    with pytest.raises(ConfigError, match=r"input features differ(.|\n)*pre-trained(.|\n)*'multiply': 3.0(.|\n)*"
                                          r"fine-tuning data.features(.|\n)*'multiply': 2.0"):
        build_finetune_model(cfg, manifest)

    # a backbone key set to another value than the checkpoint's
    cfg = load_config(finetune_config(tmp_path, chain["tokens"], "dim", model=dict(TINY_MODEL, dim=24, num_heads=2),
                                      finetune={"mode": "full", "pretrained": pretrained}))
    with pytest.raises(ConfigError, match=r"model.dim=24 \(checkpoint: 16\)"):
        build_finetune_model(cfg, manifest)

    # a token-mode backbone whose vocabulary is not the data's (codebook 16 vs 32)
    fake = tmp_path / "token-ckpt"
    fake.mkdir()
    pre_cfg = load_config(None, ["stage=pretrain", f"data.path={chain['tokens']}", "model.input_mode=token",
                                 "model.dim=16", "model.num_heads=2", "model.num_blocks=1", "model.head_blocks=1"])
    from jetfm.models.pretrain import build_pretrain_model

    small = build_pretrain_model(pre_cfg, {"tokens": {"codebook_size": 16}, "classes": manifest.classes})
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(fake / "model.safetensors"))
    (fake / "config.yaml").write_text(pre_cfg.to_yaml())
    cfg = load_config(finetune_config(tmp_path, chain["tokens"], "vocab", model={"dropout": 0.0},
                                      finetune={"mode": "full", "pretrained": str(fake)}))
    with pytest.raises(ConfigError, match=rf"vocabulary differs: pre-trained {fake} has 18 token ids(.|\n)*"
                                          rf"{chain['tokens']} has codebook 32"):
        build_finetune_model(cfg, manifest)

    # not a pre-training checkpoint
    with pytest.raises(ConfigError, match="expected a pre-training run's out_dir/final"):
        read_pretrained(tmp_path)


def test_labels_outside_the_classes_and_empty_classes_are_errors(tmp_path, pythia_toptag):
    cfg = load_config(finetune_config(tmp_path, pythia_toptag, "labels"))
    manifest = Manifest.load(pythia_toptag)
    model = build_finetune_model(cfg, manifest)
    batch = next(iter(make_loader(cfg.data, "val", shuffle=False)))
    batch.labels = batch.labels.clone()
    batch.labels[3] = 2
    with pytest.raises(DataError, match=r"labels outside the classifier's classes \['QCD', 'Tbqq'\].*\[0, 2\]"):
        model(batch)

    manifest.splits["val"] = [dict(s, class_counts=[s["class_counts"][0], 0]) for s in manifest.splits["val"]]
    cfg.train.eval_every = 10
    with pytest.raises(DataError, match=r"split 'val' has no jets of class\(es\) \['Tbqq'\]"):
        build_finetune_model(cfg, manifest)


def test_config_cross_checks():
    base = ["stage=finetune", "data.path=x"]
    assert load_config(None, base).finetune.mode == "scratch"  # the defaults are consistent
    with pytest.raises(ConfigError, match="finetune.mode=scratch trains from random weights"):
        load_config(None, base + ["finetune.pretrained=runs/joint/final"])
    with pytest.raises(ConfigError, match="finetune.mode=frozen starts from a pre-trained backbone"):
        load_config(None, base + ["finetune.mode=frozen"])
    with pytest.raises(ConfigError, match="backbone_lr_scale=0.1 has no effect with finetune.mode=frozen"):
        load_config(None, base + ["finetune.mode=frozen", "finetune.pretrained=p", "finetune.backbone_lr_scale=0.1"])
    with pytest.raises(ConfigError, match="feeds the label to the classifier"):
        load_config(None, base + ["model.conditioning=class"])
    with pytest.raises(ConfigError, match="finetune.select_metric: must be one of"):
        load_config(None, base + ["finetune.select_metric=auc"])
    # the shipped configs load
    for name in ("finetune_toptag", "finetune_jetclass"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
        assert cfg.stage == "finetune" and cfg.finetune.mode == "full" and cfg.finetune.head_blocks == 2


def test_two_process_ddp_finetune_from_a_pretrained_backbone(tmp_path, chain):
    """DDP (2 CPU processes): no unused parameter (the NTP start vector is dropped), the validation
    AUC is computed over both ranks' jets, rank 0 exports the best model."""
    from test_distributed import launch

    config = finetune_config(tmp_path, chain["tokens"], "ddp", model={"dropout": 0.1},
                             finetune={"mode": "full", "pretrained": str(chain["pretrained"]), "backbone_lr_scale": 0.3},
                             train={"max_steps": 4, "eval_every": 2, "eval_batches": 2, **QUIET})
    rc, out, _ = launch("ddp", config)
    assert rc == 0, out[-4000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["distributed"]["num_processes"] == 2 and summary["steps"] == 4
    assert 0.0 <= summary["val"]["auc"] <= 1.0 and summary["best"]["step"] in (2, 4)
    model, _, _ = load_classifier(tmp_path / "ddp" / "best")
    assert "backbone.start" not in model.state_dict()
