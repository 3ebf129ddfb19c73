"""The scaling report end to end: run records (JSON or run directories) -> study.md, fit.json, plots."""

import json

import numpy as np
import pytest

from jetfm.config_io import load_config
from jetfm.models.pretrain import build_pretrain_model
from jetfm.scaling.__main__ import main
from jetfm.scaling.ladder import model_parameters
from jetfm.scaling.report import RecordError, load_records

NTP = dict(E=3.0, A=40.0, alpha=0.35, B=200.0, beta=0.22)
MPM = dict(E=3.5, A=30.0, alpha=0.30, B=150.0, beta=0.26)


def law(t, N, D):
    return t["E"] + t["A"] / N ** t["alpha"] + t["B"] / D ** t["beta"]


def synthetic_records(seed=0):
    """Three IsoFLOP budgets x 5 sizes of joint runs (both losses), D = C / (6 N) particles."""
    rng = np.random.default_rng(seed)
    records = []
    for C in (1e13, 1e14, 1e15):
        centre = np.sqrt(C / 6) / 100
        for i, N in enumerate(centre * np.geomspace(0.1, 10, 5)):
            D = C / (6 * N)
            noise = np.exp(rng.normal(0, 0.001, 2))
            records.append({"name": f"c{C:.0e}-{i}", "size": f"s{i}", "N": N, "D": D, "flops": C, "budget": C,
                            "epochs": 1.0, "losses": {"ntp": law(NTP, N, D) * noise[0], "mpm": law(MPM, N, D) * noise[1]}})
    return records


def test_fit_command_writes_the_study(tmp_path, capsys):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(synthetic_records()))
    out = tmp_path / "fit"
    assert main(["fit", str(runs), "--out", str(out), "--bootstrap", "8"]) == 0
    assert "ntp: 15 runs: alpha" in capsys.readouterr().out
    fit = json.loads((out / "fit.json").read_text())
    for obj, truth in (("ntp", NTP), ("mpm", MPM)):
        res = fit["objectives"][obj]
        a_true = truth["beta"] / (truth["alpha"] + truth["beta"])
        assert res["law"]["a"] == pytest.approx(a_true, abs=0.03)
        assert res["law"]["beta"] == pytest.approx(truth["beta"], abs=0.03)
        low, high = res["bootstrap"]["intervals"]["beta"]
        assert low <= res["law"]["beta"] <= high
        assert len(res["isoflop"]["budgets"]) == 3
        assert res["isoflop"]["a"] == pytest.approx(a_true, abs=0.05)
        assert res["frontier"][-1]["loss"] == min(r["losses"][obj] for r in fit["runs"])
    study = (out / "study.md").read_text()
    assert "| c1e+13-0 | s0 |" in study and "IsoFLOP minima: N_opt ∝ C^" in study and "| beta |" in study
    for obj in ("ntp", "mpm"):
        for name in ("loss_vs_compute", "isoflop", "loss_vs_N", "loss_vs_D", "residuals"):
            png = out / f"{obj}_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert f"({obj}_{name}.png)" in study


def _run_dir(root, name, summary, model=None, cfg=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    if model is not None:
        from safetensors.torch import save_file

        (run / "final").mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "final" / "model.safetensors"))
        (run / "final" / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_records_from_run_directories(tmp_path):
    """Today's summary.json (no scaling block): N counted from the exported weights, D in jets from
    steps x global batch, the single objective's val.loss; with a scaling block, particles."""
    cfg = load_config("configs/ntp.yaml", ["model.dim=16", "model.num_heads=2", "model.num_blocks=1"])
    model = build_pretrain_model(cfg, {"tokens": {"codebook_size": 30}, "classes": []})
    base = {"status": "completed", "stage": "pretrain", "steps": 100, "global_batch_jets": 64, "epoch": 2.5}
    _run_dir(tmp_path, "a", {**base, "name": "a", "val": {"loss": 4.2}}, model, cfg)
    _run_dir(tmp_path, "b", {**base, "name": "b", "val": {"ntp_loss": 4.0, "mpm_loss": 4.5, "loss": 8.5},
                             "scaling": {"N": 5000, "particles_seen": 3.2e5, "jets_seen": 6400, "unique_particles": 1e5,
                                         "flops": 1.1e13, "size": "xs"}})
    _run_dir(tmp_path, "c", {**base, "name": "c", "status": "interrupted"})
    records, skipped = load_records(tmp_path, "jets")
    assert [r["name"] for r in records] == ["a", "b"] and skipped == [f"{tmp_path / 'c'}: status 'interrupted'"]
    a, b = records
    assert a["N"] == model_parameters(model)[0] and a["N_total"] == model_parameters(model)[1]
    assert a["D"] == 6400 and a["unique"] == pytest.approx(6400 / 2.5) and a["losses"] == {"ntp": 4.2}
    assert a["objective"] == "ntp"
    assert b["losses"] == {"ntp": 4.0, "mpm": 4.5} and b["size"] == "xs"
    with pytest.raises(RecordError, match=r"a/summary.json: field 'scaling.particles_seen' is missing"):
        load_records(tmp_path, "particles")


def test_bad_records_are_named(tmp_path, capsys):
    runs = tmp_path / "runs.json"
    bad = synthetic_records()[:6]
    del bad[3]["N"]
    runs.write_text(json.dumps(bad))
    assert main(["fit", str(runs), "--out", str(tmp_path / "out")]) == 2
    assert "runs.json: run 3: field 'N' must be a number > 0, got None" in capsys.readouterr().err
    bad = synthetic_records()[:6]
    bad[0]["losses"] = {"clm": 3.0}
    runs.write_text(json.dumps(bad))
    assert main(["fit", str(runs), "--out", str(tmp_path / "out")]) == 2
    assert "losses.clm: unknown objective" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2


def test_few_runs_give_a_report_without_a_law(tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"runs": synthetic_records()[:3]}))
    out = tmp_path / "out"
    assert main(["fit", str(runs), "--out", str(out), "--objective", "ntp"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert "law" not in fit["objectives"]["ntp"] and "mpm" not in fit["objectives"]
    assert "needs at least 5" in (out / "study.md").read_text()
    assert (out / "ntp_loss_vs_compute.png").exists() and not (out / "ntp_residuals.png").exists()


@pytest.mark.slow
def test_records_from_a_real_pretraining_run(tmp_path, monkeypatch):
    """Today's trainer output read as a record: tokenizer -> tokenize -> ntp pre-training (3 steps)."""
    from accelerate.state import AcceleratorState, GradientState

    from jetfm import train as trainer
    from jetfm.tokenizer.tokenize import main as tokenize_main
    from test_trainer import tiny_config, write_tiny_dataset

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    data = write_tiny_dataset(tmp_path / "data")
    tok = tiny_config(tmp_path, data, name="tok", builder=None, stage="tokenizer",
                      tokenizer={"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                                 "latent_dim": 4, "codebook_size": 16},
                      train={"max_steps": 2, "eval_every": 0})
    assert trainer.main(["--config", str(tok)]) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert tokenize_main(["--tokenizer", str(tmp_path / "tok" / "final"), "--data", str(data),
                          "--out", str(tmp_path / "tokens"), "--splits", "train,val"]) == 0
    pre = tiny_config(tmp_path, tmp_path / "tokens", name="pre", builder=None, objective={"name": "ntp"},
                      model={"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
                      train={"max_steps": 3, "eval_every": 3, "eval_batches": 1})
    assert trainer.main(["--config", str(pre)]) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    (record,), skipped = load_records(tmp_path / "pre", "jets")
    assert not skipped
    assert record["N_total"] == summary["parameters"] and record["N"] < record["N_total"]
    assert record["D"] == 3 * summary["global_batch_jets"] and record["losses"] == {"ntp": pytest.approx(summary["val"]["loss"], rel=1e-6)}  # val.ntp_loss vs val.loss: same mean, fp32 vs fp64 division
