"""`jetfm demo`, reduced: the whole chain through its commands into one MLflow store and one report.

The session's Pythia jets stand in for the demo's own generation step (`--data`), which
test_generate_jets covers; everything after it runs as `jetfm demo` runs it, at tiny sizes.
"""

from __future__ import annotations

import json
import re

import pytest
from test_trainer import _fresh_accelerate_state  # noqa: F401 - autouse fixture: fresh accelerate state, 1 thread

from jetfm import cli


def test_reduced_demo_writes_a_report_and_one_mlflow_experiment(tmp_path, pythia_toptag, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--data", str(pythia_toptag), "--steps", "2", "--gen-jets", "20",
            "--batch-size", "16"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    store = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    assert f"mlflow ui --backend-store-uri {store}" in printed and str(out / "report.md") in printed

    # the report: every stage's numbers, and every plot it shows exists
    report = (out / "report.md").read_text()
    for heading in ("## Tokenizer", "## Joint NTP + MPM", "## Generated jets vs the data", "## Top tagging"):
        assert heading in report
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(images) == 7 and all((out / image).is_file() for image in images), images
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| pre") or
            line.startswith("| scratch")}
    assert set(rows) == {"pretrained", "scratch"}
    for name in rows:
        scored = json.loads((out / f"finetune-{name}" / "eval" / "test" / "metrics.json").read_text())
        assert scored["n_jets"] == 200 and f"| {scored['auc']:.4g} |" in rows[name]
    assert re.search(r"\| jet_mass \| [0-9.]+ \| [0-9.]+ \|", report) and "| jet_phi | – |" in report
    evaluation = out / "generated" / "evaluation"  # both comparisons scored, only the stored reference plotted
    assert set(json.loads((evaluation / "metrics.json").read_text())["comparisons"]) == {"reference", "tokenized"}
    assert (evaluation / "plots" / "reference").is_dir() and not (evaluation / "plots" / "tokenized").exists()

    # one store, one experiment, a finished run per training stage, plots and evaluations as artifacts
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("jetfm-demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tokenizer", "joint", "finetune-pretrained", "finetune-scratch"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    artifacts = {name: {a.path for a in client.list_artifacts(r.info.run_id)} for name, r in runs.items()}
    assert "plots" in artifacts["tokenizer"] and "generative_eval" in artifacts["joint"]
    assert any(m.startswith("gen/") for m in runs["joint"].data.metrics)
    for name in ("finetune-pretrained", "finetune-scratch"):
        scored = json.loads((out / name / "eval" / "test" / "metrics.json").read_text())
        assert runs[name].data.metrics["test/auc"] == pytest.approx(scored["auc"])

    # rerunning continues: every stage is done, nothing is trained again
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "starting fresh" not in err and err.count("done already") == 4 and "$ jetfm evaluate" not in err
