"""The model-size ladder: parameter counts from real models, the closed formula, config checks."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from jetfm.config import ConfigError
from jetfm.config_io import load_config
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.pretrain import build_pretrain_model
from jetfm.scaling.ladder import build_ladder, count_parameters, format_ladder, formula_parameters, load_ladder, model_parameters

LADDER = "configs/scaling/ladder.yaml"


def test_shipped_ladder_counts_real_models_and_agrees_with_the_formula():
    cfg = load_config("configs/joint.yaml")
    rungs = build_ladder(load_ladder(LADDER), cfg, vocab_size=514)
    assert [r.name for r in rungs] == ["xxs", "xs", "s", "m", "l", "xl", "ref"]  # sorted by N
    for r in rungs:
        assert (r.N, r.N_total) == (r.N_formula, r.N_total_formula), r.name
        assert r.N < r.N_total
    assert rungs[-1].N / rungs[0].N > 100  # the ladder spans > 2 decades
    ref = rungs[-1].model  # "ref" is the published reference model of configs/joint.yaml
    assert (ref.dim, ref.num_blocks, ref.num_heads, ref.head_blocks) == (
        cfg.model.dim, cfg.model.num_blocks, cfg.model.num_heads, cfg.model.head_blocks)
    text = format_ladder(rungs)
    assert "NO" not in text and f"{rungs[0].N:,}" in text


@pytest.mark.parametrize("objective", ["ntp", "mpm", "joint"])
@pytest.mark.parametrize("input_mode,conditioning", [("continuous", "none"), ("token", "multiplicity"),
                                                      ("continuous", "class")])
def test_formula_matches_real_model(objective, input_mode, conditioning):
    model_cfg = ModelConfig(dim=24, num_heads=3, num_blocks=2, head_blocks=1, mlp_ratio=3.0, head_mlp_ratio=1.5,
                            input_mode=input_mode, conditioning=conditioning, max_particles=20)
    obj = ObjectiveConfig(name=objective, num_mask_vectors=12)
    cfg = SimpleNamespace(model=model_cfg, objective=obj,
                          data=SimpleNamespace(features={"a": {}, "b": {}, "c": {}, "d": {}}, inputs="raw"))
    model = build_pretrain_model(cfg, {"tokens": {"codebook_size": 40}, "classes": ["q", "t", "w"]})
    real = model_parameters(model)
    assert real[1] == sum(p.numel() for p in model.parameters())
    assert real == formula_parameters(model_cfg, obj, vocab_size=42, num_features=4, num_classes=3)


def test_N_excludes_embeddings_and_unembedding():
    """A larger vocabulary grows N_total only; a deeper model grows N."""
    cfg = load_config("configs/joint.yaml")
    sizes = {"a": {"dim": 32, "num_heads": 2, "num_blocks": 2}, "b": {"dim": 32, "num_heads": 2, "num_blocks": 3}}
    small, large = build_ladder(sizes, cfg, vocab_size=66), build_ladder(sizes, cfg, vocab_size=1026)
    assert [r.N for r in small] == [r.N for r in large]
    assert all(big.N_total - r.N_total == 2 * 960 * 32 for r, big in zip(small, large))  # two heads' projections
    assert small[1].N - small[0].N == 12 * 32 * 32 + 13 * 32  # one block (mlp_ratio 4, biases, 2 LayerNorms)


def test_count_parameters_from_a_checkpoint_header(tmp_path):
    """The same split from a saved model's tensor names and shapes (what the run reader sees)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = load_config("configs/joint.yaml", ["model.dim=16", "model.num_heads=2", "model.num_blocks=1"])
    model = build_pretrain_model(cfg, {"tokens": {"codebook_size": 30}, "classes": []})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        numels = [(k, torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys()]
    assert count_parameters(numels) == model_parameters(model)


def test_bad_ladder_files_name_the_size_and_key(tmp_path):
    path = tmp_path / "ladder.yaml"
    path.write_text("sizes:\n  s: {dim: 32, num_heads: 2, num_block: 2}\n")
    with pytest.raises(ConfigError, match=r"sizes\.s\.num_block .*num_blocks"):
        load_ladder(path)
    path.write_text("sizes:\n  s: {dim: 30, num_heads: 4}\n")
    with pytest.raises(ConfigError, match=r"sizes\.s: .*divisible"):
        load_ladder(path)
    path.write_text("sizes:\n  s: {dim: 32, input_mode: token}\n")
    with pytest.raises(ConfigError, match="not a model size key"):
        load_ladder(path)
    path.write_text("size:\n  s: {dim: 32}\n")
    with pytest.raises(ConfigError, match="sizes"):
        load_ladder(path)
    cfg = load_config("configs/joint.yaml")
    with pytest.raises(ValueError, match="same N"):
        build_ladder({"a": {"dim": 32, "num_heads": 2}, "b": {"dim": 32, "num_heads": 4}}, cfg, vocab_size=66)
    assert dataclasses.is_dataclass(cfg.model)
