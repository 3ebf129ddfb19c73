"""jetfm.generate: KV-cached sampling == full-prefix recompute, valid jets, shards, errors, real chain.

The module fixture runs the real chain on the Pythia session data: a tiny tokenizer through the
trainer -> `jetfm data tokenize --with-reco` -> a tiny joint (NTP + MPM) continuous-input
pre-training through the trainer (MLflow on). Other model variants (token input, MPM only,
class / multiplicity conditioning) are built directly with wider-than-default random weights, so
their next-token distributions are peaked and a wrong cache would change the samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jetfm.config_io import load_config
from jetfm.data.format import JET_FEATURES, KINEMATIC_FEATURES
from jetfm.data.physics import jets_from_constituents
from jetfm.data.reader import iterate_jets
from jetfm.data.shards import Manifest
from jetfm.artifacts.runs import find_run_record
from jetfm.data.jetframe import GENERATED_SPLIT
from jetfm.generate import (
    add_generate_arguments,
    generate_to_shards,
    load_pretrain_checkpoint,
    resolve_checkpoint_dir,
    run_generate,
)
from jetfm.sampling import GenerationError, _CachedStepper, _RecomputeStepper, generate_jets, sample_tokens
from jetfm.models.pretrain import build_pretrain_model
from jetfm.tokenizer.config import TokenizerConfig
from jetfm.tokenizer.model import ParticleTokenizer, TokenizerMismatchError, load_tokenizer, save_tokenizer

L = 24  # length limit used in most tests (the models allow 128)


# --------------------------------------------------------------------------- the chain
def _run_trainer(config: dict, path: Path) -> int:
    from accelerate.state import AcceleratorState, GradientState

    from jetfm import train as trainer

    path.write_text(yaml.safe_dump(config))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return trainer.main(["--config", str(path)])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _export(cfg, model, directory: Path) -> Path:
    """A pre-training export as train.py writes it (model.safetensors + config.yaml)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.yaml").write_text(cfg.to_yaml())
    return directory


def _random_model(base_config: Path, manifest: Manifest, directory: Path, *overrides: str, seed: int = 0):
    cfg = load_config(base_config, list(overrides))
    torch.manual_seed(seed)
    model = build_pretrain_model(cfg, manifest)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("start"):
                p.normal_(0.0, 0.4)  # peaked distributions: samples depend on every cached state
    return _export(cfg, model.eval(), directory)


@pytest.fixture(scope="module")
def chain(pythia_toptag, tmp_path_factory):
    from jetfm.tokenizer.tokenize import tokenize_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen-chain")
    common = {"seed": 1, "train": {"max_steps": 20, "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
                                   "progress_bar": False}}
    tok_cfg = {**common, "stage": "tokenizer", "name": "tok", "out_dir": str(root / "tok"),
               "data": {"path": str(pythia_toptag), "batch_size": 50, "shuffle_buffer": 100},
               "tokenizer": {"hidden_dim": 16, "num_heads": 2, "encoder_blocks": 1, "decoder_blocks": 1,
                             "latent_dim": 4, "codebook_size": 32, "dead_code_every": 10, "min_utilisation": 0.0},
               "optim": {"lr": 3e-3}, "tracking": {"enabled": False}}
    assert _run_trainer(tok_cfg, root / "tok.yaml") == 0
    tokenizer_dir = root / "tok" / "final"
    tokens = root / "tokens"
    tokenize_dataset(tokenizer_dir, pythia_toptag, tokens, splits=["train"], with_reco=True, progress=False)
    pre_cfg = {**common, "stage": "pretrain", "name": "pre", "out_dir": str(root / "pre"),
               "data": {"path": str(tokens), "batch_size": 50, "shuffle_buffer": 100, "inputs": "reco"},
               "model": {"dim": 16, "num_heads": 2, "num_blocks": 1, "head_blocks": 1, "dropout": 0.0},
               "objective": {"name": "joint"}, "optim": {"lr": 3e-3},
               "tracking": {"enabled": True, "experiment": "gen-test"}}
    pre_cfg["train"] = {**common["train"], "max_steps": 30}
    assert _run_trainer(pre_cfg, root / "pre.yaml") == 0
    final = root / "pre" / "final"
    manifest = Manifest.load(tokens)
    config = final / "config.yaml"
    models = {
        "trained": final,
        "continuous": _random_model(config, manifest, root / "m-continuous"),
        "token": _random_model(config, manifest, root / "m-token", "model.input_mode=token"),
        "mpm": _random_model(config, manifest, root / "m-mpm", "objective.name=mpm"),
        "class": _random_model(config, manifest, root / "m-class", "model.conditioning=class"),
        "multiplicity": _random_model(config, manifest, root / "m-mult", "model.conditioning=multiplicity"),
    }
    return {"root": root, "tokenizer": tokenizer_dir, "tokens": tokens, "models": models, "data": pythia_toptag}


def _load(chain, name):
    cfg, model, _ = load_pretrain_checkpoint(chain["models"][name])
    return cfg, model, load_tokenizer(chain["tokenizer"])


# --------------------------------------------------------------------------- cache == recompute
@pytest.mark.parametrize("name", ["continuous", "token"])
def test_cached_step_logits_equal_full_recompute(chain, name):
    """Feeding the same tokens, the cached step's logits equal the full-prefix recompute's at every position."""
    cfg, model, tokenizer = _load(chain, name)
    B, steps = 5, 12
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, tokenizer.codebook_size + 1, (B, steps), generator=gen)
    with torch.inference_mode():
        cached = _CachedStepper(model, tokenizer, lambda x: x, B, steps, "cpu")
        full = _RecomputeStepper(model, tokenizer, lambda x: x, B, steps, "cpu")
        for t in range(steps):
            a, b = cached.logits(t, None, None), full.logits(t, None, None)
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
            assert a.std() > 0.3  # peaked: logits differ a lot between tokens
            cached.feed(t, ids[:, t], last=False)
            full.feed(t, ids[:, t], last=False)


@pytest.mark.parametrize("name", ["trained", "continuous", "token"])
def test_cached_generation_equals_full_prefix_recompute(chain, name):
    cfg, model, tokenizer = _load(chain, name)
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(11)
        runs.append(generate_jets(model, tokenizer, 20, batch_size=8, max_length=L, temperature=1.5,
                                  generator=generator, use_cache=use_cache, input_features=cfg.data.features))
    cached, full = runs
    assert torch.equal(cached.cu_seqlens, full.cu_seqlens)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.features, full.features, atol=1e-4, rtol=1e-4)
    assert 0 < int(cached.stopped.sum()) < 20 or name == "trained"  # both endings occur on the peaked models
    tokens, cu, features = cached  # unpacks as documented
    assert features.shape == (tokens.numel(), tokenizer.n_features)


def test_generated_jets_are_valid(chain):
    cfg, model, tokenizer = _load(chain, "token")
    out = generate_jets(model, tokenizer, 40, batch_size=16, max_length=L, temperature=2.0,
                        generator=torch.Generator().manual_seed(0))
    lengths = out.lengths
    assert lengths.min() >= 1 and lengths.max() <= L
    assert torch.equal(out.stopped, lengths < L)  # shorter than the limit <=> it sampled stop
    assert out.stopped.any() and (~out.stopped).any()
    K = tokenizer.codebook_size
    assert out.tokens.min() >= 1 and out.tokens.max() <= K  # neither start nor stop inside a jet
    assert torch.isfinite(out.features).all()
    # the same seed gives the same jets; another seed others
    again = generate_jets(model, tokenizer, 40, batch_size=16, max_length=L, temperature=2.0,
                          generator=torch.Generator().manual_seed(0))
    other = generate_jets(model, tokenizer, 40, batch_size=16, max_length=L, temperature=2.0,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.tokens, out.tokens) and not torch.equal(other.tokens, out.tokens)


def test_min_length_and_sampling_controls(chain):
    cfg, model, tokenizer = _load(chain, "continuous")
    forced = generate_jets(model, tokenizer, 6, batch_size=6, max_length=10, min_length=10, temperature=5.0,
                           input_features=cfg.data.features)
    assert forced.lengths.tolist() == [10] * 6 and not forced.stopped.any()
    # top-k 1 and a tiny top-p are greedy: independent of the random numbers
    greedy = [generate_jets(model, tokenizer, 4, batch_size=4, max_length=8, generator=torch.Generator().manual_seed(s),
                            input_features=cfg.data.features, **kw)
              for s, kw in ((0, {"top_k": 1}), (1, {"top_k": 1}), (2, {"top_p": 1e-6}))]
    assert all(torch.equal(g.tokens, greedy[0].tokens) for g in greedy)
    logits = torch.randn(3, 10)
    kept = {int(sample_tokens(logits, torch.rand(3), stop_id=9, allow_stop=True, top_k=3)[0]) for _ in range(50)}
    assert kept <= set(torch.topk(logits[0, 1:], 3).indices.add(1).tolist())  # top-k among tokens 1..9
    assert int(sample_tokens(torch.zeros(1, 10), torch.tensor([0.999999]), stop_id=9, allow_stop=False)) == 8


def test_progress_moves_per_finished_jet_not_per_batch(chain):
    cfg, model, tokenizer = _load(chain, "trained")

    class Counter:  # what generate_jets asks of a tqdm bar
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    bar = Counter()
    jets = generate_jets(model, tokenizer, 12, batch_size=12, max_length=L, input_features=cfg.data.features,
                         generator=torch.Generator().manual_seed(3), progress=bar)
    assert sum(bar.updates) == 12 and all(n > 0 for n in bar.updates)
    # one move per step at which jets ended (the last step's and the length limit's together, at the end)
    assert len(bar.updates) == len({min(n, L - 1) for n in jets.lengths.tolist()}) > 1


def test_sampler_matches_the_token_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 2
    u = torch.rand(20000)
    draws = sample_tokens(logits.expand(20000, -1), u, stop_id=299, allow_stop=True)
    probs = torch.softmax(logits[0].clone().index_fill_(0, torch.tensor([0]), -math.inf), 0)
    counts = torch.bincount(draws, minlength=300).double() / 20000
    assert counts[0] == 0
    assert (counts - probs).abs().max() < 0.01


# --------------------------------------------------------------------------- shards
def test_generate_to_shards_writes_physical_jet_frame_shards(chain, tmp_path):
    out = tmp_path / "gen"
    manifest = generate_to_shards(chain["models"]["trained"], out, 30, batch_size=16, max_length=L, seed=5,
                                  temperature=1.2, top_k=20, jets_per_shard=20, progress=False)
    assert manifest.classes == ["generated"] and manifest.n_jets(GENERATED_SPLIT) == 30
    assert len(manifest.shards(GENERATED_SPLIT)) == 2
    source = manifest.source
    assert Path(source["checkpoint"]) == chain["models"]["trained"].resolve()
    assert Path(source["tokenizer"]) == chain["tokenizer"].resolve()
    assert source["seed"] == 5 and source["sampling"]["top_k"] == 20 and source["sampling"]["max_length"] == L
    assert source["frame"].startswith("jet frame") and source["n_jets"] == 30
    assert source["mlflow"]["run_id"]  # the training run, from the trainer's records
    assert manifest.tokens["codebook_size"] == 32
    jets = next(iter(iterate_jets(out, GENERATED_SPLIT)))
    for chunk in iterate_jets(out, GENERATED_SPLIT):
        mult = chunk.multiplicity
        assert mult.min() >= 1 and mult.max() <= L
        px, py, pz, e = chunk.part[:, :4].T.astype(np.float64)
        pt = np.hypot(px, py)
        assert (e > 0).all() and np.allclose(e, np.sqrt(px**2 + py**2 + pz**2), rtol=1e-4)  # massless, GeV
        assert 0.01 < np.median(pt) < 500
        for b in range(len(chunk)):  # pT-sorted within every jet
            s = slice(chunk.offsets[b], chunk.offsets[b + 1])
            assert (np.diff(pt[s]) <= 1e-3).all()
        expected = jets_from_constituents(chunk.part[:, :4], chunk.offsets)
        # compared as m^2: recomputed from the float32 constituents, a nearly massless jet's m^2 = E^2 - p^2
        # carries a rounding error of order 1e-7 E^2 (a mass of 0.005 can read 0)
        mass2 = chunk.jet[:, JET_FEATURES.index("jet_mass")].astype(np.float64) ** 2
        energy2 = expected["jet_energy"] ** 2
        assert (np.abs(mass2 - expected["jet_mass"] ** 2) <= 1e-6 * energy2 + 1e-4 * expected["jet_mass"] ** 2).all()
        assert (chunk.label == 0).all()
        assert chunk.tokens.min() >= 1 and chunk.tokens.max() <= 32
        assert np.isfinite(chunk.part).all() and np.isfinite(chunk.jet).all()
    assert list(Manifest.load(out).particle_features) == list(KINEMATIC_FEATURES) and len(jets)
    # rerunning into the same directory needs --overwrite
    with pytest.raises(GenerationError, match="overwrite"):
        generate_to_shards(chain["models"]["trained"], out, 5, max_length=L, progress=False)


def test_cli_and_class_conditioning(chain, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    out = tmp_path / "top"
    args = parser.parse_args(["--checkpoint", str(chain["models"]["class"]), "--n-jets", "12", "--out", str(out),
                              "--batch-size", "8", "--max-length", "12", "--class", "Tbqq", "--seed", "2", "--quiet"])
    assert run_generate(args) == 0
    assert "12 jets" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.classes == ["QCD", "Tbqq"] and manifest.class_counts(GENERATED_SPLIT) == [0, 12]
    # unconditioned request on the class model: classes drawn with the training fractions
    drawn = generate_to_shards(chain["models"]["class"], tmp_path / "drawn", 40, max_length=6, progress=False)
    assert all(c > 0 for c in drawn.class_counts(GENERATED_SPLIT))
    mult = generate_to_shards(chain["models"]["multiplicity"], tmp_path / "mult", 5, max_length=8, multiplicity=6,
                              progress=False)
    assert mult.source["sampling"]["multiplicity"] == 6
    drawn = generate_to_shards(chain["models"]["multiplicity"], tmp_path / "mult-drawn", 5, max_length=8,
                               progress=False)  # multiplicities drawn from the training jets, clipped to 8
    assert "clipped to 8" in drawn.source["sampling"]["conditioning_values"]


# --------------------------------------------------------------------------- bad input
def test_errors_name_the_problem(chain, tmp_path):
    models = chain["models"]
    with pytest.raises(GenerationError, match="no NTP head"):
        generate_to_shards(models["mpm"], tmp_path / "a", 4, progress=False)
    with pytest.raises(GenerationError, match="max_length=129"):
        generate_to_shards(models["trained"], tmp_path / "b", 4, max_length=129, progress=False)
    with pytest.raises(GenerationError, match="class conditioning"):
        generate_to_shards(models["trained"], tmp_path / "c", 4, class_name="Tbqq", progress=False)
    with pytest.raises(GenerationError, match="more particles"):
        generate_to_shards(models["multiplicity"], tmp_path / "d", 4, multiplicity=200, progress=False)
    with pytest.raises(GenerationError, match="would be cut"):
        generate_to_shards(models["multiplicity"], tmp_path / "d", 4, multiplicity=20, max_length=10, progress=False)
    with pytest.raises(GenerationError, match="unknown"):
        generate_to_shards(models["class"], tmp_path / "e", 4, class_name="Wqq", progress=False)
    # tokenizers that do not fit the checkpoint: other codebook, other features
    small = ParticleTokenizer(TokenizerConfig(hidden_dim=16, num_heads=2, encoder_blocks=1, decoder_blocks=1,
                                              latent_dim=4, codebook_size=16))
    save_tokenizer(small, tmp_path / "tok16")
    with pytest.raises(TokenizerMismatchError, match="16 codes"):
        generate_to_shards(models["trained"], tmp_path / "f", 4, tokenizer_dir=tmp_path / "tok16", progress=False)
    other = ParticleTokenizer(TokenizerConfig(hidden_dim=16, num_heads=2, encoder_blocks=1, decoder_blocks=1,
                                              latent_dim=4, codebook_size=32),
                              {"part_pt": {"function": "log"}, "part_etarel": {}, "part_deltaR": {}})
    save_tokenizer(other, tmp_path / "tok-features")
    with pytest.raises(TokenizerMismatchError, match="part_phirel"):
        generate_to_shards(models["trained"], tmp_path / "g", 4, tokenizer_dir=tmp_path / "tok-features", progress=False)
    for tokenizer in (chain["tokenizer"], chain["root"] / "tok"):  # its export, its run dir
        with pytest.raises(GenerationError, match="this is a tokenizer export; pass a pre-training run or its final/"):
            generate_to_shards(tokenizer, tmp_path / "h", 4, progress=False)
    with pytest.raises(GenerationError, match="not a pre-training export"):
        generate_to_shards(tmp_path, tmp_path / "h", 4, progress=False)
    assert resolve_checkpoint_dir(chain["root"] / "pre") == models["trained"]  # a run dir means its final/
    assert not any((tmp_path / d).exists() for d in "abcdefgh")  # nothing written on errors
    # a copy of the tokenizer fits, but is not the recorded one: a warning
    import shutil

    shutil.copytree(chain["tokenizer"], tmp_path / "tok-copy")
    with pytest.warns(UserWarning, match="not the one recorded"):
        generate_to_shards(models["trained"], tmp_path / "i", 2, max_length=4, tokenizer_dir=tmp_path / "tok-copy",
                           progress=False)


# --------------------------------------------------------------------------- the real chain, evaluated
def test_generate_then_evaluate_logs_to_the_training_run(chain, tmp_path):
    from mlflow.tracking import MlflowClient

    from jetfm.evaluation import evaluate_generative

    out = tmp_path / "gen"
    generate_to_shards(chain["models"]["trained"], out, 40, batch_size=20, max_length=32, seed=0, progress=False)
    result = evaluate_generative(out, chain["data"], reference_split="test", max_jets=60, plots=False, verbose=False)
    assert set(result["comparisons"]) == {"reference", "tokenized"}
    rows = {r["observable"]: r for r in result["comparisons"]["tokenized"]["all"]["rows"]}
    assert all(r["w1"] >= 0 for r in rows.values())
    assert all(r["kl"] >= 0 for n, r in rows.items() if n not in ("jet_eta", "jet_phi"))  # offsets: W1 only
    run = find_run_record(chain["models"]["trained"])
    assert result["mlflow"]["run_id"] == run["run_id"] and not result["mlflow"]["new_run"]
    client = MlflowClient(run["uri"])
    history = client.get_metric_history(run["run_id"], "gen/tokenized/all/jet_mass/kl")
    assert [m.step for m in history] == [30]  # at the checkpoint's training step
    assert history[0].value == pytest.approx(rows["jet_mass"]["kl"])
    files = [f.path for f in client.list_artifacts(run["run_id"], "generative_eval/gen")]
    assert "generative_eval/gen/metrics.json" in files
    assert json.loads((out / "evaluation" / "metrics.json").read_text())["mlflow"]["run_id"] == run["run_id"]
