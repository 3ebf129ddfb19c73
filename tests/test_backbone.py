"""Backbone: config checks, build, packing, no positional encoding, causal flag, KV-cache generation."""

from types import SimpleNamespace

import pytest
import torch

from jetfm.data.batch import JetBatch
from jetfm.models.attention import Packing, flash_available
from jetfm.models.backbone import Backbone
from jetfm.models.config import ModelConfig, ObjectiveConfig
from jetfm.models.pretrain import PretrainModel, build_pretrain_model

F_IN, CODEBOOK = 3, 13
VOCAB = CODEBOOK + 2


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=16, num_heads=2, num_blocks=2, head_blocks=1, dropout=0.0, max_particles=12)
    return ModelConfig(**{**base, **kw})


def random_batch(lengths, seed=0, num_classes=3) -> JetBatch:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return JetBatch(
        x=torch.randn(T, F_IN, generator=g),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        labels=torch.randint(0, num_classes, (len(lengths),), generator=g),
        jet=torch.zeros(len(lengths), 6),
        tokens=torch.randint(1, CODEBOOK + 1, (T,), generator=g),
        reco=torch.randn(T, F_IN, generator=g),
    )


def run_config(model_kw=None, objective_kw=None, features=("part_pt", "part_etarel", "part_phirel"), inputs="raw"):
    return SimpleNamespace(
        model=tiny_cfg(**(model_kw or {})),
        objective=ObjectiveConfig(**(objective_kw or {})),
        data=SimpleNamespace(features={f: {} for f in features}, inputs=inputs),
    )


MANIFEST = SimpleNamespace(tokens={"codebook_size": CODEBOOK}, classes=["QCD", "Hbb", "Tbqq"])



# --------------------------------------------------------------------------- config / build
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dim=30, num_heads=8), "divisible"),
        (dict(input_mode="pixels"), "input_mode"),
        (dict(attention="flex"), "attention"),
        (dict(conditioning="energy"), "conditioning"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_blocks=0), "num_blocks"),
    ],
)
def test_model_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="mlm"), "objective.name"),
        (dict(mask_fraction=1.0), "mask_fraction"),
        (dict(mask_fraction=0.0), "mask_fraction"),
        (dict(ntp_weight=0.0, mpm_weight=0.0), "joint"),
        (dict(num_mask_vectors=0), "num_mask_vectors"),
    ],
)
def test_objective_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kw)


def test_every_config_field_has_a_docstring():
    import ast
    import inspect

    import jetfm.models.config as module

    tree = ast.parse(inspect.getsource(module))
    for cls in (c for c in tree.body if isinstance(c, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), f"{cls.name}.{node.target.id}"


def test_build_reference_size_and_vocabulary():
    cfg = SimpleNamespace(model=ModelConfig(), objective=ObjectiveConfig(),
                          data=SimpleNamespace(features={"a": {}, "b": {}, "c": {}}, inputs="raw"))
    model = build_pretrain_model(cfg, SimpleNamespace(tokens={"codebook_size": 8192}, classes=["a", "b"]))
    assert model.vocab_size == 8194 and model.stop_id == 8193
    assert model.ntp.head.out.out_features == 8194 and model.mpm.head.out.out_features == 8194
    assert model.backbone.input_proj.in_features == 3
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 1.5e6 < n_backbone < 1.7e6  # docs/METHOD.md §3: ≈1.6M parameters


def test_build_needs_tokenizer_in_manifest():
    with pytest.raises(ValueError, match="codebook_size"):
        build_pretrain_model(run_config(), SimpleNamespace(tokens=None, classes=[]))


@pytest.mark.skipif(flash_available(), reason="flash-attn usable here")
def test_build_raises_for_flash_on_cpu():
    with pytest.raises(ValueError, match="flash"):
        build_pretrain_model(run_config(model_kw=dict(attention="flash")), MANIFEST)


# --------------------------------------------------------------------------- backbone behaviour
def backbone_out(backbone, batch, *, causal):
    packing = Packing(batch.cu_seqlens, batch.max_seqlen, batch.num_particles)
    return backbone(backbone.embed_particles(batch.x), packing, causal=causal)


def test_packed_equals_one_jet_at_a_time():
    torch.manual_seed(0)
    backbone = Backbone(tiny_cfg(), vocab_size=VOCAB, num_features=F_IN).eval()
    batch = random_batch([4, 1, 7])
    for causal in (True, False):
        packed = backbone_out(backbone, batch, causal=causal)
        cu = batch.cu_seqlens.tolist()
        for j in range(3):
            one = random_batch([cu[j + 1] - cu[j]])
            one.x = batch.x[cu[j]:cu[j + 1]]
            torch.testing.assert_close(packed[cu[j]:cu[j + 1]], backbone_out(backbone, one, causal=causal), atol=1e-5, rtol=1e-5)


def test_bidirectional_is_permutation_equivariant_causal_is_not():
    """No positional encoding: only the causal mask breaks permutation symmetry."""
    torch.manual_seed(0)
    backbone = Backbone(tiny_cfg(), vocab_size=VOCAB, num_features=F_IN).eval()
    batch = random_batch([6])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = random_batch([6])
    shuffled.x = batch.x[perm]
    bidir, bidir_p = backbone_out(backbone, batch, causal=False), backbone_out(backbone, shuffled, causal=False)
    torch.testing.assert_close(bidir[perm], bidir_p, atol=1e-5, rtol=1e-5)
    causal, causal_p = backbone_out(backbone, batch, causal=True), backbone_out(backbone, shuffled, causal=True)
    assert not torch.allclose(causal[perm], causal_p, atol=1e-3)


def test_causal_backbone_sees_only_the_past():
    torch.manual_seed(0)
    backbone = Backbone(tiny_cfg(), vocab_size=VOCAB, num_features=F_IN).eval()
    batch = random_batch([7, 5])
    base = backbone_out(backbone, batch, causal=True)
    perturbed = random_batch([7, 5])
    perturbed.x = batch.x.clone()
    perturbed.x[4] += 3.0  # particle 4 of jet 0
    out = backbone_out(backbone, perturbed, causal=True)
    torch.testing.assert_close(out[:4], base[:4])
    torch.testing.assert_close(out[7:], base[7:])
    assert not torch.allclose(out[4:7], base[4:7])


def test_dropout_only_in_training():
    torch.manual_seed(0)
    backbone = Backbone(tiny_cfg(dropout=0.5), vocab_size=VOCAB, num_features=F_IN)
    batch = random_batch([5, 3])
    a, b = backbone_out(backbone, batch, causal=False), backbone_out(backbone, batch, causal=False)
    assert not torch.allclose(a, b)
    backbone.eval()
    torch.testing.assert_close(backbone_out(backbone, batch, causal=False), backbone_out(backbone, batch, causal=False))


# --------------------------------------------------------------------------- KV-cache generation
@pytest.mark.parametrize(
    "model_kw",
    [dict(), dict(input_mode="token"), dict(conditioning="multiplicity"), dict(conditioning="class", input_mode="token")],
)
def test_kv_cache_steps_equal_full_causal_logits(model_kw):
    torch.manual_seed(0)
    cfg = run_config(model_kw=model_kw, objective_kw=dict(name="ntp"))
    model = build_pretrain_model(cfg, MANIFEST).eval()
    n = 6
    batch = random_batch([n, n, n])
    with torch.no_grad():
        full, _ = model.ntp_logits(batch)  # ((n + 1) * B, V)
        full = full.view(3, n + 1, VOCAB)
        cache = model.new_cache(3)
        cond = dict(multiplicity_B=batch.seqlens, labels_B=batch.labels)
        x_BNF, _ = batch.padded()
        tokens_BN = batch.pad(batch.tokens)
        steps = [model.ntp_logits_step(cache, **cond)]
        for i in range(n):
            particle = dict(x_BF=x_BNF[:, i]) if model.model_cfg.input_mode == "continuous" else dict(tokens_B=tokens_BN[:, i])
            steps.append(model.ntp_logits_step(cache, **particle, **cond))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.seen == n + 1 and cache.num_layers == 2 + 1


def test_kv_cache_first_step_takes_no_particle():
    model = build_pretrain_model(run_config(objective_kw=dict(name="ntp")), MANIFEST).eval()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="start"):
        model.ntp_logits_step(cache, x_BF=torch.zeros(2, F_IN))


def test_mpm_only_model_has_no_generation():
    model = build_pretrain_model(run_config(objective_kw=dict(name="mpm")), MANIFEST)
    assert model.ntp is None and isinstance(model.backbone, Backbone)
    with pytest.raises(ValueError, match="NTP"):
        model.new_cache(2)


def test_reco_inputs_are_used_when_configured():
    torch.manual_seed(0)
    raw = build_pretrain_model(run_config(objective_kw=dict(name="ntp")), MANIFEST).eval()
    reco = PretrainModel(raw.model_cfg, raw.objective_cfg, vocab_size=VOCAB, num_features=F_IN, inputs="reco").eval()
    reco.load_state_dict(raw.state_dict())
    batch = random_batch([4, 3])
    with torch.no_grad():
        a, b = raw.ntp_logits(batch)[0], reco.ntp_logits(batch)[0]
        batch.x = batch.reco
        torch.testing.assert_close(raw.ntp_logits(batch)[0], b)
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- GPU parity
@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
def test_flash_model_matches_sdpa_model():
    """Same weights, bf16 autocast on CUDA: flash and sdpa give the same losses, NTP logits and cached steps."""
    torch.manual_seed(0)
    sdpa = build_pretrain_model(run_config(model_kw=dict(dim=64, num_heads=4)), MANIFEST).cuda().eval()
    flash = build_pretrain_model(run_config(model_kw=dict(dim=64, num_heads=4, attention="flash")), MANIFEST).cuda().eval()
    flash.load_state_dict(sdpa.state_dict())
    batch = random_batch([12, 3, 7, 1, 9]).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out_s = sdpa(batch, generator=torch.Generator("cuda").manual_seed(0))
        out_f = flash(batch, generator=torch.Generator("cuda").manual_seed(0))
        torch.testing.assert_close(out_f["loss"].float(), out_s["loss"].float(), atol=2e-2, rtol=2e-2)
        logits_s, _ = sdpa.ntp_logits(batch)
        logits_f, _ = flash.ntp_logits(batch)
        torch.testing.assert_close(logits_f.float(), logits_s.float(), atol=5e-2, rtol=5e-2)
        equal = random_batch([5, 5]).to("cuda")
        full = flash.ntp_logits(equal)[0].view(2, 6, VOCAB).float()
        cache = flash.new_cache(2)
        x_BNF, _ = equal.padded()
        steps = [flash.ntp_logits_step(cache)] + [flash.ntp_logits_step(cache, x_BF=x_BNF[:, i]) for i in range(5)]
        torch.testing.assert_close(torch.stack(steps, 1).float(), full, atol=5e-2, rtol=5e-2)
