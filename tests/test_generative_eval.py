"""jetfm.evaluation.generative end to end: ≈0 for a sample against itself, > 0 for a shifted copy,
the tokenized reference, per-class comparisons, files, MLflow logging and the command line.

Samples are built from the Pythia session data (no model needed): its test split moved into the
jet frame and written like generated jets, and a copy with pT x1.3 and η_rel x1.5.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from jetfm.data.features import particle_features
from jetfm.data.format import JetArrays
from jetfm.data.reader import iterate_jets
from jetfm.data.shards import Manifest
from jetfm.evaluation import add_generative_arguments, evaluate_generative, run_generative
from jetfm.evaluation.generative import JET_NAMES, PARTICLE_NAMES, in_jet_frame
from jetfm.data.jetframe import GENERATED_SPLIT, RELATIVE_FEATURES, jet_frame_jets
from jetfm.generate import write_jet_frame_shards
from jetfm.tokenizer.config import TokenizerConfig
from jetfm.tokenizer.model import ParticleTokenizer, save_tokenizer
from jetfm.tokenizer.tokenize import tokens_description


def _write(directory, jets, manifest, source, tokens=None):
    return write_jet_frame_shards(directory, [jets], classes=manifest.classes, source=source, tokens=tokens,
                                  jets_per_shard=150, chunk_size=50)


@pytest.fixture(scope="module")
def samples(pythia_toptag, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-eval")
    manifest = Manifest.load(pythia_toptag)
    jets = JetArrays.concat(list(iterate_jets(pythia_toptag, "test")))
    rel = particle_features(jets.part, jets.offsets, manifest.particle_features, RELATIVE_FEATURES)
    torch_tok = ParticleTokenizer(TokenizerConfig(hidden_dim=16, num_heads=2, encoder_blocks=1, decoder_blocks=1,
                                                  latent_dim=4, codebook_size=32))
    tokenizer = save_tokenizer(torch_tok, root / "tokenizer")

    # a fake training run: run dir with summary.json naming an MLflow run, the checkpoint in final/
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval-test", artifact_location=(root / "art").as_uri())).info.run_id
    (root / "run" / "final").mkdir(parents=True)
    (root / "run" / "summary.json").write_text(json.dumps({"steps": 7, "mlflow": {"uri": uri, "run_id": run_id}}))
    source = {"kind": "test", "checkpoint": str(root / "run" / "final"), "experiment": "eval-test", "name": "fake"}

    # a generated set carries each particle's sampled token id (the manifest's `tokens` promises them)
    sampled = np.random.default_rng(0).integers(1, 33, size=len(rel))
    frame, _ = jet_frame_jets(rel[:, 0], rel[:, 1], rel[:, 2], jets.offsets, jets.label, tokens=sampled)
    _write(root / "gen", frame, manifest, source, tokens_description(torch_tok, tokenizer))
    shifted, _ = jet_frame_jets(rel[:, 0] * 1.3, rel[:, 1] * 1.5, rel[:, 2], jets.offsets, jets.label)
    _write(root / "shifted", shifted, manifest, {"kind": "test"})
    return {"root": root, "data": pythia_toptag, "gen": root / "gen", "shifted": root / "shifted",
            "tokenizer": tokenizer, "uri": uri, "run_id": run_id, "n": len(jets)}


def _rows(result, comparison="reference", cls="all"):
    return {r["observable"]: r for r in result["comparisons"][comparison][cls]["rows"]}


def test_a_sample_against_itself_is_zero_and_files_are_written(samples, tmp_path):
    out = tmp_path / "self"
    result = evaluate_generative(samples["gen"], samples["gen"], reference_split=GENERATED_SPLIT, out_dir=out,
                                 tracking=False, tokenizer_dir=tmp_path / "none", per_class_plots=False, verbose=False)
    assert in_jet_frame(Manifest.load(samples["gen"]))
    assert set(result["comparisons"]) == {"reference"}  # the tokenizer given does not exist
    assert set(result["comparisons"]["reference"]) == {"all", "QCD", "Tbqq"}
    for cls, entry in result["comparisons"]["reference"].items():
        rows = {r["observable"]: r for r in entry["rows"]}
        assert set(rows) == set(PARTICLE_NAMES) | set(JET_NAMES)
        for name, row in rows.items():
            # KL: bins empty in both samples cost ~1e-6 each (the documented floor of empty generated bins)
            assert row["w1"] == pytest.approx(0, abs=1e-12)
            assert math.isnan(row["kl"]) if name in ("jet_eta", "jet_phi") else row["kl"] == pytest.approx(0, abs=1e-4)
        # unbiased MMD of a sample with itself (not independent draws) sits at -O(1/n), never above 0
        assert entry["kpd"] < 1e-3 and entry["fpd"] == pytest.approx(0, abs=1e-6)
    assert entry["n_gen_jets"] == entry["n_ref_jets"] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["comparisons"]["reference"]["all"]["rows"][0]["kl"] == pytest.approx(0, abs=1e-4)
    assert {r["observable"]: r["kl"] for r in saved["comparisons"]["reference"]["all"]["rows"]}["jet_phi"] is None
    table = (out / "metrics.md").read_text()
    assert "| jet_mass |" in table and "| jet_phi | – |" in table and "nan" not in table  # no KL of frame offsets
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "plots/reference/all/jet_mass.png" in pngs and "plots/reference/all/part_ptrel.png" in pngs
    assert len(pngs) == 10 and all((out / p).stat().st_size > 10_000 for p in pngs)


def test_a_shifted_sample_is_clearly_worse(samples, tmp_path):
    result = evaluate_generative(samples["shifted"], samples["gen"], reference_split=GENERATED_SPLIT,
                                 out_dir=tmp_path / "shifted", tracking=False, plots=False, verbose=False)
    rows = _rows(result)
    for name, floor in (("jet_pt", 0.1), ("jet_mass", 0.1), ("part_etarel", 0.03)):
        assert rows[name]["kl"] > floor and rows[name]["w1"] > 0, name
    assert rows["jet_pt"]["w1"] > 50  # GeV: pT x1.3 of ~600 GeV jets
    assert rows["part_ptrel"]["kl"] < 1e-4 and rows["jet_nparticles"]["kl"] < 1e-4  # scale-free / untouched
    assert result["comparisons"]["reference"]["all"]["kpd"] > 0.1


def test_tokenized_reference_and_mlflow_run_of_the_checkpoint(samples, tmp_path):
    """Reference = the stored (lab-frame) Pythia jets and their tokenized-then-decoded version; logged to the
    checkpoint's run at its step, then to a new run when the checkpoint has no run record."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "eval"
    result = evaluate_generative(samples["gen"], samples["data"], reference_split="test", out_dir=out,
                                 plots=False, verbose=False)
    assert set(result["comparisons"]) == {"reference", "tokenized"}
    # the raw reference is the same jets as the 'generated' ones (same frame transform): ≈ 0
    assert all(not r["kl"] > 1e-4 and r["w1"] < 1e-9 for r in _rows(result).values())  # NaN: frame offsets
    # an untrained tokenizer decodes nonsense: far from the generated (= data) jets
    assert _rows(result, "tokenized")["part_etarel"]["kl"] > 0.1
    assert result["mlflow"]["run_id"] == samples["run_id"] and result["mlflow"]["step"] == 7
    client = MlflowClient(samples["uri"])
    history = client.get_metric_history(samples["run_id"], "gen/tokenized/QCD/jet_mass/kl")
    assert [m.step for m in history] == [7]
    assert history[0].value == pytest.approx(_rows(result, "tokenized", "QCD")["jet_mass"]["kl"])
    files = {f.path for f in client.list_artifacts(samples["run_id"], "generative_eval/gen")}
    assert {"generative_eval/gen/metrics.json", "generative_eval/gen/metrics.md"} <= files

    # no run record: a new run in the same experiment, tagged with the checkpoint
    (samples["root"] / "run" / "summary.json").rename(samples["root"] / "run" / "summary.moved")
    try:
        manifest = Manifest.load(samples["gen"])
        other = tmp_path / "orphan"
        _write(other, next(iter(iterate_jets(samples["gen"], GENERATED_SPLIT))), manifest, manifest.source)
        second = evaluate_generative(other, samples["gen"], reference_split=GENERATED_SPLIT, plots=False,
                                     tracking_uri=samples["uri"], verbose=False)
    finally:
        (samples["root"] / "run" / "summary.moved").rename(samples["root"] / "run" / "summary.json")
    assert second["mlflow"]["new_run"] and second["mlflow"]["run_id"] != samples["run_id"]
    run = client.get_run(second["mlflow"]["run_id"])
    assert run.data.tags["jetfm.checkpoint"] == manifest.source["checkpoint"]
    assert math.isfinite(run.data.metrics["gen/reference/all/jet_pt/w1"])


def test_command_line(samples, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_generative_arguments(parser)
    args = parser.parse_args(["--generated", str(samples["shifted"]), "--reference", str(samples["gen"]),
                              "--reference-split", GENERATED_SPLIT, "--out", str(tmp_path / "cli"), "--max-jets", "50",
                              "--no-plots", "--no-tracking", "--bins", "20"])
    assert run_generative(args) == 0
    printed = capsys.readouterr().out
    assert "| observable | KL (ref‖gen) | W1 |" in printed and "jet_tau32" in printed
    assert "| jet_eta | – |" in printed and "nan" not in printed
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["n_bins"] == 20 and saved["comparisons"]["reference"]["all"]["n_gen_jets"] == 50
    bad = parser.parse_args(["--generated", str(samples["gen"]), "--reference", str(samples["gen"]),
                             "--reference-split", "nope", "--no-tracking"])
    assert run_generative(bad) == 2
    assert "no split 'nope'" in capsys.readouterr().err
