"""The config system: YAML + dotlist overrides, strict keys with suggestions, types, cross-checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from jetfm.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    config_to_dict,
)
from jetfm.config_io import describe_keys, field_docs, flatten, load_config


def write(tmp_path, data: dict | str, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path, data, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), list(overrides))
    return str(info.value)


def test_yaml_plus_overrides_resolve(tmp_path):
    path = write(tmp_path, "stage: tokenizer\nname: tok\noptim:\n  lr: 1e-3\n  betas: [0.9, 0.99]\n"
                           "train:\n  max_steps: 5e4\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.precision=bf16", "data.path=data/toptag",
                             "tracking.tags={team: jets}", "tokenizer.codebook_size=512"])
    assert cfg.stage == "tokenizer" and cfg.out_dir == "runs/tok" and cfg.tracking.run_name == "tok"
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.train.max_steps == 50000 and isinstance(cfg.train.max_steps, int)  # 5e4 from YAML
    assert cfg.train.precision == "bf16" and cfg.data.path == "data/toptag"
    assert cfg.tracking.tags == {"team": "jets"} and cfg.tokenizer.codebook_size == 512


def test_yaml_floats_without_a_dot(tmp_path):
    cfg = load_config(write(tmp_path, "stage: pretrain\noptim:\n  lr: 1e-3\n  eps: 1e-8\n"))
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-8


def test_reference_defaults():
    cfg = Config()
    assert cfg.data.batch_size == 250 and cfg.data.max_particles == 128 and cfg.data.shuffle_buffer == 10000
    assert cfg.data.features == {
        "part_pt": {"function": "signed_log", "subtract": 1.8, "multiply": 1.0},
        "part_etarel": {"function": "none", "subtract": 0.0, "multiply": 3.0},
        "part_phirel": {"function": "none", "subtract": 0.0, "multiply": 3.0},
    }
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.grad_clip) == (
        "adamw", 1e-3, 1e-2, (0.95, 0.999), 1.0)
    assert cfg.tracking.experiment == "jetfm" and cfg.tracking.uri is None


@pytest.mark.parametrize(
    "data, overrides, expected",
    [
        ({"stage": "pretrain", "optim": {"lrr": 1}}, [], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"stage": "pretrain", "train": {"lr": 1}}, [], "unknown key 'train.lr'; did you mean 'optim.lr'?"),
        ({"stage": "pretrain", "trian": {}}, [], "unknown key 'trian'; did you mean 'train'?"),
        ({"stage": "pretrain", "model": {"dmi": 64}}, [], "unknown key 'model.dmi'; did you mean 'model.dim'?"),
        ({"stage": "pretrain"}, ["data.batchsize=3"], "unknown key 'data.batchsize'; did you mean 'data.batch_size'?"),
        ({"stage": "pretrain"}, ["tracking.experimnt=x"], "did you mean 'tracking.experiment'?"),
        ({"stage": "pretrain", "data": {"features": {"part_pt": {"sbtract": 1}}}}, [],
         "unknown key 'data.features.part_pt.sbtract'; did you mean 'data.features.part_pt.subtract'?"),
        ({"stage": "pretrain"}, ["data.features.part_pt.mutliply=2"], "did you mean 'data.features.part_pt.multiply'?"),
    ],
)
def test_unknown_keys_name_the_full_key_and_the_closest(tmp_path, data, overrides, expected):
    assert expected in error_of(tmp_path, data, overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lr=abc"], "optim.lr: expected a number, got str 'abc'"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer, got float 1.5"),
        (["train.progress_bar=maybe"], "train.progress_bar: expected true or false, got str 'maybe'"),
        (["train.precision=bf61"], "train.precision: must be one of 'fp32', 'bf16', 'fp16', got 'bf61' (did you mean 'bf16'?)"),
        (["stage=pretrian"], "did you mean 'pretrain'?"),
        (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values, got 1"),
        (["seed=null"], "seed: may not be null"),
        (["name=123"], "name: expected a string, got int 123 (quote it in YAML)"),
        (["optim.lr.x=1"], "'optim.lr' is a float, not a section"),
        (["data=3"], "data: expected a mapping (section DataConfig), got int 3"),
        (["optim.lr"], "expected key.sub=value"),
        (["data.features.part_pt.function=sqrt"], "data.features.part_pt: transform function 'sqrt' unknown"),
    ],
)
def test_values_are_type_checked(tmp_path, overrides, expected):
    assert expected in error_of(tmp_path, {"stage": "pretrain"}, overrides)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.dim=130"], "model.dim=130 must be divisible by model.num_heads=8"),
        (["data.max_particles=256"], "model.max_particles=128 < data.max_particles=256"),
        (["optim.warmup_steps=5", "train.max_steps=3"], "optim.warmup_steps=5 > train.max_steps=3"),
        (["stage=tokenizer", "data.inputs=reco"], "data.inputs=reco needs a trained tokenizer"),
        (["model.num_features=4"], "model.num_features=4 but data.features has 3 entries"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["train.eval_every=-1"], "train.eval_every must be >= 0"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["tokenizer.codebook_size=1"], "tokenizer.codebook_size must be at least 2"),
        (["name=a/b"], "without '/'"),
    ],
)
def test_cross_checks(tmp_path, overrides, expected):
    assert expected in error_of(tmp_path, {"stage": "pretrain"}, overrides)


def test_missing_stage_and_bad_files(tmp_path):
    assert "missing key 'stage'" in error_of(tmp_path, {"name": "x"})
    assert "top level must be a mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "not valid YAML" in error_of(tmp_path, "stage: [\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(write(tmp_path, {"name": "x"}), ["stage=finetune"]).stage == "finetune"


def test_feature_overrides_edit_the_default_set(tmp_path):
    path = write(tmp_path, {"stage": "tokenizer"})
    cfg = load_config(path, ["data.features.part_pt.subtract=2.0", "data.features.part_energy.function=log"])
    assert list(cfg.data.features) == ["part_pt", "part_etarel", "part_phirel", "part_energy"]
    assert cfg.data.features["part_pt"] == {"function": "signed_log", "subtract": 2.0, "multiply": 1.0}
    assert cfg.data.features["part_energy"] == {"function": "log", "subtract": 0.0, "multiply": 1.0}
    # a YAML features mapping replaces the set (order = model input order); missing fields default
    cfg = load_config(write(tmp_path, {"stage": "tokenizer", "data": {"features": {"part_etarel": {"multiply": 2}}}}))
    assert cfg.data.features == {"part_etarel": {"function": "none", "subtract": 0.0, "multiply": 2.0}}


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, {"stage": "pretrain", "name": "rt"}),
                      ["optim.schedule=cosine", "optim.warmup_steps=10", "tracking.tags={a: b}"])
    text = cfg.to_yaml()
    again = load_config(write(tmp_path, text, "resolved.yaml"))
    assert again == cfg
    json.dumps(config_to_dict(cfg))  # JSON-safe too (MLflow params, summary)
    flat = flatten(config_to_dict(cfg))
    assert flat["optim.betas"] == [0.95, 0.999] and flat["data.features.part_pt.subtract"] == 1.8


def test_every_field_is_documented():
    for cls in (Config, DataConfig, OptimConfig, TrainConfig, TrackingConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    keys = {row[0]: row for row in describe_keys()}
    assert keys["optim.lr"][1:3] == ("float", 1e-3)
    assert "Peak learning rate" in keys["optim.lr"][3]
    assert "tokenizer.codebook_size" in keys and "objective.mask_fraction" in keys


# ------------------------------------------------------------------------ choices: one style
@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.attention=flsh", "model.attention: must be one of 'auto', 'sdpa', 'flash', got 'flsh' (did you mean 'flash'?)"),
        ("model.input_mode=tokens", "model.input_mode: must be one of 'continuous', 'token', got 'tokens'"),
        ("model.conditioning=mass", "model.conditioning: must be one of 'none', 'multiplicity', 'class', got 'mass'"),
        ("objective.name=jiont", "objective.name: must be one of 'ntp', 'mpm', 'joint', got 'jiont'"),
        ("tokenizer.codebook_update=emma", "tokenizer.codebook_update: must be one of 'affine', 'ema', got 'emma'"),
        ("tokenizer.codebook_init=kmean", "tokenizer.codebook_init: must be one of 'sample', 'gaussian', 'kmeans'"),
        ("tokenizer.on_collapse=ignore", "tokenizer.on_collapse: must be one of 'warn', 'raise', got 'ignore'"),
        ("finetune.mode=ful", "finetune.mode: must be one of 'scratch', 'full', 'frozen', got 'ful'"),
        ("optim.schedule=step", "optim.schedule: must be one of 'constant', 'cosine', 'linear', got 'step'"),
        ("stage=sample", "stage: must be one of 'tokenizer', 'pretrain', 'finetune', got 'sample'"),
    ],
)
def test_every_choice_names_the_key_and_the_allowed_values(tmp_path, override, expected):
    assert expected in error_of(tmp_path, {"stage": "pretrain"}, [override])


def test_choices_are_checked_when_sections_are_built_in_python():
    from jetfm.finetune.config import FinetuneConfig
    from jetfm.models.config import ModelConfig, ObjectiveConfig
    from jetfm.tokenizer.config import TokenizerConfig

    cases = [
        (lambda: ModelConfig(attention="xformers"), "model.attention: must be one of 'auto', 'sdpa', 'flash', got 'xformers'"),
        (lambda: ObjectiveConfig(name="mlm"), "objective.name: must be one of 'ntp', 'mpm', 'joint', got 'mlm'"),
        (lambda: TokenizerConfig(on_collapse="ignore"), "tokenizer.on_collapse: must be one of 'warn', 'raise'"),
        (lambda: FinetuneConfig(select_metric="auc"), "finetune.select_metric: must be one of 'val_auc'"),
        (lambda: TrainConfig(precision="fp8"), "train.precision: must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        (lambda: DataConfig(inputs="tokens"), "data.inputs: must be one of 'raw', 'reco', got 'tokens'"),
        (lambda: Config(stage="generate"), "stage: must be one of 'tokenizer', 'pretrain', 'finetune'"),
    ]
    for build, expected in cases:
        with pytest.raises(ValueError) as info:
            build()
        assert expected in str(info.value)
    assert TrainConfig(precision="bf16").precision == "bf16"


def test_lists_of_names_agree_with_the_literals():
    import typing

    from jetfm import stages
    from jetfm.config import STAGES
    from jetfm.finetune.config import SELECT_METRICS, FinetuneConfig
    from jetfm.models.attention import AttentionBackend
    from jetfm.models.config import ModelConfig

    assert STAGES == ("tokenizer", "pretrain", "finetune")
    assert tuple(stages.STAGES) == STAGES  # every stage has code, no code without a stage name
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["attention"]) == tuple(backend.value for backend in AttentionBackend)
    assert set(SELECT_METRICS) == set(typing.get_args(typing.get_type_hints(FinetuneConfig)["select_metric"]))
