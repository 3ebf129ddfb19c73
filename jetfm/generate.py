"""Jet generation from a pre-trained NTP model, with KV caches: `jetfm generate`.

    jetfm generate --checkpoint runs/joint/final --n-jets 10000 --out gen/joint
    jetfm generate --checkpoint runs/joint/final --n-jets 2000 --out gen/top --class Tbqq --top-k 500 --seed 3
    jetfm evaluate generative --generated gen/joint --reference data/toptag    # then judge them

Sampling (SCIENCE.md §4). Every jet starts from the start position and samples one token per
step until it samples the stop token or reaches the length limit; jets in a batch advance in
lockstep, a jet that has stopped is masked, and every `sync_every` steps the batch is compacted
to its live jets (so stopped jets cost nothing for long). Token ids: start 0 is never sampled
(masked); stop = vocab - 1 is masked while a jet has fewer than `min_length` particles
(default 1: the first particle can never be stop, so every jet has >= 1 particle; stop is
allowed from the second position on). `min_length = max_length` forces the length (benchmarks).
Conditioning (class or multiplicity) is given to the model at every step as it was in training;
a multiplicity condition asks the model for n particles, it does not force the length.
Temperature, then top-k, then top-p (nucleus) filter the logits; the token is drawn by inverse
CDF from one uniform number per (jet, position), pre-drawn per batch from a seeded
torch.Generator, so a jet's draws do not depend on which other jets are still live: the same
seed, batch size, device and settings give the same jets.

Caches. The backbone + NTP head run one new position per step against their KV cache
(`PretrainModel.ntp_logits_step`). Token-input models feed the sampled token id; continuous-
input models feed the sampled particle as the tokenizer's causal decoder reconstructs it,
decoded incrementally with the decoder's own KV cache (`ParticleTokenizer.decode_step`), then
mapped from the tokenizer's preprocessed features to the model's (data.features; identity when
both use the same transforms — else inverse tokenizer transform, forward model transform). No
step re-runs the prefix. `use_cache=False` is the reference algorithm for tests and the
benchmark: every step re-decodes the whole prefix and re-runs the backbone on it (O(n²); it
projects only the last position onto the vocabulary, which makes it a little faster than the
reference's full-logits pass). Both paths draw the same random numbers, so with the same seed
they sample the same tokens (tests/test_generate_jets.py).

Output (`generate_to_shards`): a standard shard set, split `generated`, one chunk per
`chunk_size` jets. Particles are physical, massless four-momenta (px, py, pz, E) in GeV:
decoded features -> tokenizer Preprocessing.inverse -> (pT, η_rel, φ_rel) ->
four_momenta_from_relative with the jet axis at η = φ = 0, i.e. **generated jets live in the
jet frame** (their absolute η/φ mean nothing; jetfm.evaluation puts reference jets in the same
frame). pT below PT_FLOOR (a decoded log-pT far below the data) is raised to PT_FLOOR and counted
in the manifest. Particles are sorted by pT within each jet (the shard contract); `tokens.npy`
holds each particle's sampled token id in the same row order. Jet features = summed
constituents (physics.jets_from_constituents). Labels: the requested (or drawn) class for a
class-conditioned model, with the training data's class names; otherwise 0 with classes
["generated"]. The manifest's `source` records checkpoint, tokenizer, sampling settings, seed
and the checkpoint's MLflow run; `tokens` describes the tokenizer as `jetfm data tokenize` does.
Non-finite values are an error before the batch holding them is written.

Legend: B jets in a batch (b: live ones), L length limit (particles), V vocabulary, F features,
T packed particles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.features import FeatureTransform, Preprocessing, four_momenta_from_relative
from .data.format import JET_FEATURES, KINEMATIC_FEATURES, DataError, JetArrays
from .data.physics import jets_from_constituents
from .data.shards import Manifest, ShardWriter, creation_info

#: Split name of generated shard sets.
GENERATED_SPLIT = "generated"
#: Smallest particle pT written (GeV); decoded values below it are raised to it (and counted).
PT_FLOOR = 1e-3
#: The features a tokenizer must decode for jets to be turned into four-momenta.
RELATIVE_FEATURES = ("part_pt", "part_etarel", "part_phirel")
#: How generated jets' coordinates are defined (recorded in the manifest).
JET_FRAME = ("jet frame: particles placed at (eta_rel, phi_rel) around eta = phi = 0, massless; "
             "absolute jet eta/phi carry no information")


class GenerationError(ValueError):
    """Generation cannot run as asked: the message says why and what to change."""


# --------------------------------------------------------------------------- results
@dataclass
class GeneratedJets:
    """Generated jets, packed. Unpacks as `tokens, cu_seqlens, features = generated`."""

    tokens: torch.Tensor  # (T,) int64 particle token ids (code + 1), generation order
    cu_seqlens: torch.Tensor  # (N + 1,) int64 jet boundaries
    features: torch.Tensor  # (T, F) float32 decoded features, tokenizer-preprocessed space
    stopped: torch.Tensor  # (N,) bool: ended by sampling stop (False: reached the length limit)
    labels: torch.Tensor | None = None  # (N,) int64 class conditioning used
    multiplicity: torch.Tensor | None = None  # (N,) int64 multiplicity conditioning used
    seconds: float = 0.0

    def __iter__(self):
        return iter((self.tokens, self.cu_seqlens, self.features))

    @property
    def num_jets(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


# --------------------------------------------------------------------------- loading
def resolve_checkpoint_dir(path) -> Path:
    """The directory holding model.safetensors + config.yaml: PATH itself, or PATH/final (a run dir)."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.yaml").is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    raise GenerationError(
        f"{path}: not a pre-training export; expected model.safetensors + config.yaml there or in {path / 'final'} "
        "(what `python jetfm/train.py` writes for stage pretrain)"
    )


def load_pretrain_checkpoint(path, *, device="cpu"):
    """(cfg, PretrainModel in eval mode, checkpoint dir) from a pretrain export; raises GenerationError
    unless it is a pre-training checkpoint with an NTP head. Attention runs on SDPA (the KV-cache
    step is single-query attention; flash-trained weights load unchanged)."""
    from safetensors.torch import load_file

    from .config import load_config
    from .models.pretrain import PretrainModel

    directory = resolve_checkpoint_dir(path)
    cfg = load_config(directory / "config.yaml")
    if cfg.stage != "pretrain":
        raise GenerationError(f"{directory}: a {cfg.stage!r} checkpoint; generation needs a pre-training (stage pretrain) one")
    state = load_file(str(directory / "model.safetensors"), device="cpu")
    if not cfg.objective.uses_ntp or "ntp.head.out.weight" not in state:
        raise GenerationError(
            f"{directory}: this checkpoint has no NTP head (objective.name={cfg.objective.name}); generation needs a "
            "model pre-trained with objective ntp or joint"
        )
    vocab_size = state["ntp.head.out.weight"].shape[0]
    num_classes = state["backbone.cond_emb.weight"].shape[0] if cfg.model.conditioning == "class" else 0
    num_features = cfg.model.num_features
    if num_features is None and cfg.model.input_mode == "continuous":
        num_features = len(cfg.data.features)
    model_cfg = dataclasses.replace(cfg.model, attention="sdpa")
    model = PretrainModel(model_cfg, cfg.objective, vocab_size=vocab_size, num_features=num_features,
                          num_classes=num_classes, inputs=cfg.data.inputs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GenerationError(f"{directory}: weights do not fit the config's model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return cfg, model.to(device).eval(), directory


def find_run_record(checkpoint_dir) -> dict | None:
    """{"uri", "run_id"} of the MLflow run that trained a checkpoint, from the trainer's records:
    the checkpoint's trainer_state.json, the run's summary.json (PATH/.. for PATH = final), or the
    run's latest checkpoint. None when no record names a run."""
    directory = Path(checkpoint_dir)
    candidates = [
        (directory / "trainer_state.json", ("mlflow_uri", "mlflow_run_id")),
        (directory / "summary.json", ("mlflow", None)),
        (directory.parent / "summary.json", ("mlflow", None)),
    ]
    for root in (directory, directory.parent):
        latest = root / "checkpoints" / "latest"
        if latest.is_file():
            candidates.append((root / "checkpoints" / latest.read_text().strip() / "trainer_state.json",
                               ("mlflow_uri", "mlflow_run_id")))
    for path, (uri_key, run_key) in candidates:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if run_key is None:
            entry = record.get(uri_key) or {}
            uri, run_id = entry.get("uri"), entry.get("run_id")
        else:
            uri, run_id = record.get(uri_key), record.get(run_key)
        if uri and run_id:
            return {"uri": uri, "run_id": run_id, "record": str(path)}
    return None


def training_manifest(cfg) -> Manifest | None:
    """The manifest of the data the checkpoint was trained on, if it is still reachable."""
    path = getattr(cfg.data, "path", None)
    if not path:
        return None
    try:
        return Manifest.load(Path(path))
    except (DataError, OSError):
        return None


def resolve_tokenizer_dir(cfg, override=None, manifest: Manifest | None = None) -> Path:
    """--tokenizer, else the config's tokenizer.checkpoint, else the training data's tokens.tokenizer."""
    for candidate in (override, getattr(cfg.tokenizer, "checkpoint", None),
                      (manifest.tokens or {}).get("tokenizer") if manifest is not None else None):
        if candidate:
            return Path(candidate)
    raise GenerationError(
        "no tokenizer: the checkpoint's config has no tokenizer.checkpoint and its training data manifest "
        f"({getattr(cfg.data, 'path', None)}) is unreachable or records none; pass --tokenizer DIR"
    )


def check_tokenizer(model, cfg, tokenizer, tokenizer_dir, manifest: Manifest | None = None) -> None:
    """Raise TokenizerMismatchError unless the tokenizer fits the model: vocabulary (codebook + 2),
    the features it decodes (continuous input), and the training data's token description."""
    from .tokenizer.model import TokenizerMismatchError, check_manifest_tokens

    if tokenizer.codebook_size + 2 != model.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} has {tokenizer.codebook_size} codes (vocabulary {tokenizer.codebook_size + 2}) but "
            f"the checkpoint's NTP head predicts {model.vocab_size} token ids (codebook {model.vocab_size - 2})"
        )
    missing = [n for n in RELATIVE_FEATURES if n not in tokenizer.feature_names]
    if missing:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} decodes {tokenizer.feature_names}; turning generated particles into "
            f"four-momenta needs {list(RELATIVE_FEATURES)} (missing {missing})"
        )
    if model.model_cfg.input_mode == "continuous":
        FeatureMap(tokenizer.preprocessing, Preprocessing.from_config(cfg.data.features), str(tokenizer_dir))
    if manifest is not None and manifest.tokens:
        check_manifest_tokens(manifest, tokenizer, f"training data {cfg.data.path}", f"tokenizer {tokenizer_dir}")


# --------------------------------------------------------------------------- feature map
_FORWARD = {
    "none": lambda x: x,
    "log": lambda x: torch.log(torch.clamp(x, min=1e-30)),
    "signed_log": lambda x: torch.sign(x) * torch.log1p(torch.abs(x)),
}
_INVERSE = {
    "none": lambda y: y,
    "log": torch.exp,
    "signed_log": lambda y: torch.sign(y) * torch.expm1(torch.abs(y)),
}


class FeatureMap:
    """Tokenizer-preprocessed features (B, F_tok) -> the model's preprocessed inputs (B, F_model), in torch.

    Identity (no work) when both name the same features with the same transforms; otherwise
    each model feature is looked up by name, inverted to physical units with the tokenizer's
    transform and re-transformed with the model's (data.features). Raises
    TokenizerMismatchError when the model needs a feature the tokenizer does not decode."""

    def __init__(self, tokenizer_pre: Preprocessing, model_pre: Preprocessing, where: str = "tokenizer"):
        from .tokenizer.model import TokenizerMismatchError, preprocessing_spec

        tok_spec, model_spec = preprocessing_spec(tokenizer_pre), preprocessing_spec(model_pre)
        missing = [n for n in model_spec if n not in tok_spec]
        if missing:
            raise TokenizerMismatchError(
                f"the checkpoint's continuous inputs (data.features {list(model_spec)}) need {missing}, which "
                f"{where} does not decode (it decodes {list(tok_spec)})"
            )
        self.identity = list(tok_spec) == list(model_spec) and all(
            _same_transform(tok_spec[n], model_spec[n]) for n in model_spec)
        self.columns = [list(tok_spec).index(n) for n in model_spec]
        self.steps = [(FeatureTransform(**tok_spec[n]), FeatureTransform(**model_spec[n])) for n in model_spec]

    def __call__(self, x_BF: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x_BF
        out = []
        for column, (tok, mod) in zip(self.columns, self.steps):
            physical = _INVERSE[tok.function](x_BF[:, column] / tok.multiply + tok.subtract)
            out.append((_FORWARD[mod.function](physical) - mod.subtract) * mod.multiply)
        return torch.stack(out, dim=1)


def _same_transform(a: dict, b: dict) -> bool:
    return a["function"] == b["function"] and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
                                                  for k in ("subtract", "multiply"))


# --------------------------------------------------------------------------- sampling
def sample_tokens(logits_BV: torch.Tensor, u_B: torch.Tensor, *, stop_id: int, allow_stop: bool,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token id per row (B,) int64: start (0) masked, stop masked unless allow_stop, then
    temperature, top-k and top-p; drawn by inverse CDF at the uniform numbers u_B in [0, 1).
    `logits_BV` is left unchanged."""
    return _sample_inplace(logits_BV.float().clone(), u_B, stop_id=stop_id, allow_stop=allow_stop,
                           temperature=temperature, top_k=top_k, top_p=top_p)


#: Vocabulary block of the two-level inverse CDF (a cumsum over the whole vocabulary is the
#: slowest op of a CPU sampling step; block sums + one block's cumsum are a fraction of it).
CDF_BLOCK = 128


def _sample_inplace(logits: torch.Tensor, u_B: torch.Tensor, *, stop_id: int, allow_stop: bool,
                    temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """sample_tokens on a float32 (B, V) tensor that it overwrites (no (B, V) temporaries on the
    common path: temperature, masks and exp run in place)."""
    B, V = logits.shape
    if temperature != 1.0:
        logits.div_(temperature)
    logits[:, 0] = -math.inf
    if not allow_stop:
        logits[:, stop_id] = -math.inf
    if top_k is not None and top_k < V:
        kth_B1 = torch.topk(logits, top_k, dim=1).values[:, -1:]
        logits.masked_fill_(logits < kth_B1, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits, dim=1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=1)
        # drop a token once the more probable ones already hold top_p (the most probable always stays)
        drop_BV = (torch.cumsum(probs_BV, dim=1) - probs_BV) >= top_p
        logits.scatter_(1, order_BV, sorted_BV.masked_fill_(drop_BV, -math.inf))
    weights = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()  # unnormalised probabilities, in place
    # two-level inverse CDF: pick the block, then the token inside it
    n_blocks = -(-V // CDF_BLOCK)
    padded = weights if n_blocks * CDF_BLOCK == V else torch.nn.functional.pad(weights, (0, n_blocks * CDF_BLOCK - V))
    blocks_BNK = padded.view(B, n_blocks, CDF_BLOCK)
    sums_BN = blocks_BNK.sum(dim=2)
    cdf_BN = torch.cumsum(sums_BN, dim=1)
    target_B1 = u_B[:, None].to(cdf_BN.dtype) * cdf_BN[:, -1:]
    # first block whose cdf exceeds the target (never an empty block), but not past the last
    # non-empty one (u * total can round up to total)
    last_block_B1 = n_blocks - 1 - torch.flip(sums_BN > 0, dims=[1]).int().argmax(dim=1, keepdim=True)
    block_B1 = torch.minimum(torch.searchsorted(cdf_BN, target_B1, right=True), last_block_B1)
    inner_BK = blocks_BNK.gather(1, block_B1[:, :, None].expand(B, 1, CDF_BLOCK)).squeeze(1)
    rest_B1 = target_B1 - (cdf_BN - sums_BN).gather(1, block_B1)  # target minus the mass before the block
    # same rule inside the block; rounding may leave the rest at the block's total: last token with weight
    last_B1 = CDF_BLOCK - 1 - torch.flip(inner_BK > 0, dims=[1]).int().argmax(dim=1, keepdim=True)
    inner_B1 = torch.minimum(torch.searchsorted(torch.cumsum(inner_BK, dim=1), rest_B1, right=True), last_B1)
    return (block_B1 * CDF_BLOCK + inner_B1).squeeze(1)


# --------------------------------------------------------------------------- steppers
class _CachedStepper:
    """Backbone + NTP head on their KV cache; continuous input decoded with the decoder's cache."""

    def __init__(self, model, tokenizer, fmap, batch: int, length: int, device):
        self.model, self.tokenizer, self.fmap = model, tokenizer, fmap
        self.continuous = model.model_cfg.input_mode == "continuous"
        self.cache = model.new_cache(batch, max_len=length, device=device)
        self.dcache = tokenizer.new_cache(batch, capacity=length, device=device) if self.continuous else None
        self.next_input = None  # (b, F) features or (b,) token ids of the last sampled particle
        self.gives_features = self.continuous

    def logits(self, t: int, multiplicity_b, labels_b) -> torch.Tensor:
        kwargs = dict(multiplicity_B=multiplicity_b, labels_B=labels_b)
        if t > 0:
            kwargs["x_BF" if self.continuous else "tokens_B"] = self.next_input
        return self.model.ntp_logits_step(self.cache, **kwargs)

    def feed(self, t: int, tokens_b: torch.Tensor, last: bool) -> torch.Tensor | None:
        if not self.continuous:
            self.next_input = tokens_b
            return None
        features_bF = self.tokenizer.decode_step(self.dcache, tokens_b)
        if not last:
            self.next_input = self.fmap(features_bF)
        return features_bF

    def compact(self, keep: torch.Tensor) -> None:
        # all jets sit at the same position, so selecting batch rows keeps the caches consistent
        self.cache.select(keep)
        if self.dcache is not None:
            self.dcache.select(keep)
        if self.next_input is not None:
            self.next_input = self.next_input.index_select(0, keep)


class _RecomputeStepper:
    """The reference algorithm: every step re-decodes the whole prefix (continuous input) and
    re-runs backbone + head stack on [start, p1..pt]; only the last position is projected onto
    the vocabulary (which makes this reference faster than a full-logits recompute)."""

    def __init__(self, model, tokenizer, fmap, batch: int, length: int, device):
        self.model, self.tokenizer, self.fmap = model, tokenizer, fmap
        self.continuous = model.model_cfg.input_mode == "continuous"
        self.prefix_bL = torch.ones(batch, length, dtype=torch.long, device=device)
        self.gives_features = False

    def logits(self, t: int, multiplicity_b, labels_b) -> torch.Tensor:
        from .models.attention import Packing

        backbone, head = self.model.backbone, self.model.ntp.head
        b, device = self.prefix_bL.shape[0], self.prefix_bL.device
        start_bD = backbone.embed_start(b)
        if t > 0:
            ids_T = self.prefix_bL[:, :t].reshape(-1)
            if self.continuous:
                cu = torch.arange(b + 1, device=device, dtype=torch.int32) * t
                x_TF = self.fmap(self.tokenizer.decode(ids_T, cu, t))
                h_TD = backbone.embed_particles(x_TF=x_TF)
            else:
                h_TD = backbone.embed_particles(tokens_T=ids_T)
            h_TD = torch.cat([start_bD.to(h_TD.dtype)[:, None], h_TD.view(b, t, -1)], 1).reshape(b * (t + 1), -1)
        else:
            h_TD = start_bD.contiguous()
        n = t + 1
        packing = Packing(torch.arange(b + 1, device=device, dtype=torch.int32) * n, n, b * n, buckets=1)
        z_TD = backbone(h_TD, packing, causal=True, cond_BD=backbone.condition(multiplicity_b, labels_b))
        last_b = torch.arange(b, device=device) * n + t
        return head.out(head.stack(z_TD, packing, causal=True, rows=last_b))

    def feed(self, t: int, tokens_b: torch.Tensor, last: bool) -> None:
        self.prefix_bL[:, t] = tokens_b

    def compact(self, keep: torch.Tensor) -> None:
        self.prefix_bL = self.prefix_bL.index_select(0, keep)


# --------------------------------------------------------------------------- generation
def _per_jet(value, n_jets: int, name: str, device) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.long)
    if tensor.ndim == 0:
        tensor = tensor.expand(n_jets)
    if tensor.shape != (n_jets,):
        raise GenerationError(f"{name}: expected one value or {n_jets} values (one per jet), got shape {tuple(tensor.shape)}")
    return tensor.to(device)


def check_request(model, *, max_length=None, min_length: int = 1, labels=None, multiplicity=None) -> int:
    """Validate a generation request against the model; returns the length limit L."""
    m = model.model_cfg
    if model.ntp is None:
        raise GenerationError("this model has no NTP head (objective mpm); generation needs ntp or joint")
    L = m.max_particles if max_length is None else int(max_length)
    if not 1 <= L <= m.max_particles:
        raise GenerationError(f"max_length={L}: the model generates 1..{m.max_particles} particles (model.max_particles)")
    if not 1 <= min_length <= L:
        raise GenerationError(f"min_length={min_length} must lie in [1, max_length={L}]")
    mode = m.conditioning
    if labels is not None and mode != "class":
        raise GenerationError(f"class conditioning asked for, but the model was trained with conditioning={mode!r}")
    if multiplicity is not None and mode != "multiplicity":
        raise GenerationError(f"multiplicity conditioning asked for, but the model was trained with conditioning={mode!r}")
    if mode == "class" and labels is None:
        raise GenerationError("the model is class-conditioned: give the class of every jet (labels / --class)")
    if mode == "multiplicity" and multiplicity is None:
        raise GenerationError("the model is multiplicity-conditioned: give the multiplicities (multiplicity / --multiplicity)")
    if labels is not None:
        n_classes = model.backbone.cond_emb.num_embeddings
        values = torch.as_tensor(labels)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= n_classes):
            raise GenerationError(f"class labels must lie in [0, {n_classes}) (the model's classes), got "
                                  f"[{int(values.min())}, {int(values.max())}]")
    if multiplicity is not None:
        values = torch.as_tensor(multiplicity)
        if values.numel() and (int(values.min()) < 1 or int(values.max()) > m.max_particles):
            raise GenerationError(
                f"multiplicity must lie in [1, {m.max_particles}] (model.max_particles): more particles than the "
                f"model's maximum, got [{int(values.min())}, {int(values.max())}]"
            )
        if values.numel() and int(values.max()) > L:
            raise GenerationError(f"multiplicity {int(values.max())} > max_length={L}: such jets would be cut; "
                                  "raise max_length")
    return L


@torch.inference_mode()
def generate_jets(
    model,
    tokenizer,
    n_jets: int,
    *,
    batch_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_length: int | None = None,
    min_length: int = 1,
    generator: torch.Generator | None = None,
    labels=None,
    multiplicity=None,
    use_cache: bool = True,
    input_features=None,
    sync_every: int | None = None,
    progress=None,
) -> GeneratedJets:
    """Sample `n_jets` jets autoregressively (module docstring), `batch_size` at a time.

    model: PretrainModel with an NTP head (eval mode); tokenizer: the ParticleTokenizer whose
    tokens it was trained on (decodes the particles; also the continuous inputs). labels /
    multiplicity: an int or (n_jets,) ints, required exactly when the model is conditioned on
    them. generator: a torch.Generator on the model's device (None: a fresh one seeded 0).
    use_cache=False: full-prefix recompute (reference, O(n²)). input_features: the continuous
    model's input preprocessing (its config's data.features, a Preprocessing or a FeatureMap;
    None = the tokenizer's own, i.e. decoded features are fed unchanged). sync_every: steps between
    checks for "all stopped" + compaction (a host sync; default 1 on CPU, 8 on GPU).
    progress: a tqdm-like object updated with the number of finished jets.
    """
    if n_jets < 1 or batch_size < 1:
        raise GenerationError(f"n_jets and batch_size must be >= 1, got {n_jets} and {batch_size}")
    if temperature <= 0 or not math.isfinite(temperature):
        raise GenerationError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must lie in (0, 1], got {top_p}")
    L = check_request(model, max_length=max_length, min_length=min_length, labels=labels, multiplicity=multiplicity)
    if tokenizer.codebook_size + 2 != model.vocab_size:
        from .tokenizer.model import TokenizerMismatchError

        raise TokenizerMismatchError(f"tokenizer has {tokenizer.codebook_size} codes, the model's vocabulary is "
                                     f"{model.vocab_size} (codebook {model.vocab_size - 2})")
    if model.training or tokenizer.training:
        warnings.warn("generate_jets: model or tokenizer in training mode (dropout active); call .eval() first",
                      stacklevel=2)
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    labels_N = _per_jet(labels, n_jets, "labels", device)
    mult_N = _per_jet(multiplicity, n_jets, "multiplicity", device)
    fmap = None
    if model.model_cfg.input_mode == "continuous":
        if isinstance(input_features, FeatureMap):
            fmap = input_features
        else:
            model_pre = tokenizer.preprocessing if input_features is None else (
                input_features if isinstance(input_features, Preprocessing) else Preprocessing.from_config(input_features))
            fmap = FeatureMap(tokenizer.preprocessing, model_pre)
    stepper_cls = _CachedStepper if use_cache else _RecomputeStepper
    started = time.perf_counter()
    tokens, lengths, stopped, features = [], [], [], []
    for first in range(0, n_jets, batch_size):
        B = min(batch_size, n_jets - first)
        rows = slice(first, first + B)
        u_BL = torch.rand(B, L, generator=generator, device=device)
        stepper = stepper_cls(model, tokenizer, fmap, B, L, device)
        tok_BL, len_B, feat_BLF = _generate_batch(
            stepper, model, u_BL, L=L, min_length=min_length, temperature=temperature, top_k=top_k, top_p=top_p,
            labels_B=None if labels_N is None else labels_N[rows],
            mult_B=None if mult_N is None else mult_N[rows], sync_every=sync_every,
        )
        valid_BL = torch.arange(L, device=device)[None, :] < len_B[:, None]
        tok_T = tok_BL[valid_BL]
        if feat_BLF is not None:
            feat_TF = feat_BLF[valid_BL]
        else:
            cu_B1 = torch.zeros(B + 1, dtype=torch.int32, device=device)
            cu_B1[1:] = torch.cumsum(len_B, 0)
            feat_TF = tokenizer.decode(tok_T, cu_B1, L)
        tokens.append(tok_T.cpu())
        features.append(feat_TF.float().cpu())
        lengths.append(len_B.cpu())
        stopped.append((len_B < L).cpu())  # a jet shorter than L sampled stop (stop can't be sampled at L)
        if progress is not None:
            progress.update(B)
    lengths_N = torch.cat(lengths)
    cu = torch.zeros(n_jets + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths_N, 0)
    return GeneratedJets(
        tokens=torch.cat(tokens), cu_seqlens=cu, features=torch.cat(features), stopped=torch.cat(stopped),
        labels=None if labels_N is None else labels_N.cpu(), multiplicity=None if mult_N is None else mult_N.cpu(),
        seconds=time.perf_counter() - started,
    )


def _generate_batch(stepper, model, u_BL, *, L, min_length, temperature, top_k, top_p, labels_B, mult_B, sync_every):
    """One batch in lockstep: (tokens (B, L) with stop after the end, lengths (B,), features (B, L, F) | None)."""
    B, device = u_BL.shape[0], u_BL.device
    stop = model.stop_id
    tokens_BL = torch.full((B, L), stop, dtype=torch.long, device=device)
    feats_BLF = None
    rows_b = slice(None)  # original rows of the live cache rows: all of them until the first compaction
    done_b = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(L):
        logits_bV = stepper.logits(t, mult_B, labels_B)
        tok_b = _sample_inplace(logits_bV.float(), u_BL[rows_b, t], stop_id=stop, allow_stop=t >= min_length,
                                temperature=temperature, top_k=top_k, top_p=top_p)  # fresh logits: ours to overwrite
        done_b |= tok_b == stop
        tokens_BL[rows_b, t] = tok_b.masked_fill(done_b, stop)
        last = t == L - 1
        feats_bF = stepper.feed(t, tok_b.masked_fill_(done_b, 1), last)  # stopped jets feed a valid id
        if feats_bF is not None:
            if feats_BLF is None:
                feats_BLF = feats_bF.new_zeros(B, L, feats_bF.shape[1])
            feats_BLF[rows_b, t] = feats_bF
        if last or (t + 1) % sync_every:
            continue
        live = int((~done_b).sum())  # the host sync
        if live == 0:
            break
        if live <= 0.75 * done_b.numel():
            keep = torch.nonzero(~done_b).squeeze(1)
            stepper.compact(keep)
            rows_b = keep if isinstance(rows_b, slice) else rows_b[keep]
            done_b = done_b[keep]
            labels_B = None if labels_B is None else labels_B[keep]
            mult_B = None if mult_B is None else mult_B[keep]
    is_stop_BL = tokens_BL == stop
    lengths_B = torch.where(is_stop_BL.any(1), is_stop_BL.int().argmax(1), torch.full((B,), L, device=device))
    return tokens_BL, lengths_B.long(), feats_BLF


# --------------------------------------------------------------------------- physical jets
def jet_frame_jets(pt, etarel, phirel, offsets, labels, tokens=None) -> tuple[JetArrays, int]:
    """JetArrays in the jet frame from per-particle (pT [GeV], η_rel, φ_rel): massless four-momenta
    around η = φ = 0, pT-sorted within each jet, jet features from the summed constituents.
    Returns (jets, number of particles whose pT was raised to PT_FLOOR)."""
    pt = np.asarray(pt, np.float64)
    offsets = np.asarray(offsets, np.int64)
    clamped = int(np.sum(~(pt >= PT_FLOOR)))
    pt = np.where(pt >= PT_FLOOR, pt, PT_FLOOR)  # also replaces NaN pT; NaN elsewhere is caught below
    counts = np.diff(offsets)
    jet_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-pt, jet_of))  # by jet, then pT descending
    zeros = np.zeros(len(pt))
    p4 = four_momenta_from_relative(pt, np.asarray(etarel, np.float64), np.asarray(phirel, np.float64), zeros, zeros)[order]
    summed = jets_from_constituents(p4, offsets)
    jet = np.stack([summed[name] for name in JET_FEATURES], axis=1)
    jets = JetArrays(
        part=p4.astype(np.float32), offsets=offsets, jet=jet.astype(np.float32),
        label=np.asarray(labels, np.int64), tokens=None if tokens is None else np.asarray(tokens)[order].astype(np.int32),
    )
    bad_B = ~np.isfinite(jets.jet).all(1)
    bad_B[jet_of[~np.isfinite(jets.part).all(1)]] = True  # rows are sorted within jets: same jet index
    if bad_B.any():
        raise GenerationError(f"{int(bad_B.sum())} jets with non-finite values after inverting the preprocessing "
                              f"(first: jet {int(np.argmax(bad_B))} of this batch); stopped before writing them")
    return jets, clamped


def to_physical(generated: GeneratedJets, tokenizer, labels=None) -> tuple[JetArrays, dict]:
    """GeneratedJets (decoded, tokenizer-preprocessed features) -> jet-frame JetArrays + counts."""
    names = list(tokenizer.feature_names)
    raw = tokenizer.preprocessing.inverse(generated.features.numpy())
    pt, etarel, phirel = (raw[:, names.index(n)] for n in RELATIVE_FEATURES)
    if labels is None:
        labels = np.zeros(generated.num_jets, np.int64)
    offsets = generated.cu_seqlens.numpy().astype(np.int64)
    jets, clamped = jet_frame_jets(pt, etarel, phirel, offsets, labels, generated.tokens.numpy())
    # how often the sampled order was not pT-descending (the order the model was trained on)
    counts = np.diff(offsets)
    jet_of = np.repeat(np.arange(len(counts)), counts)
    rising = np.zeros(len(counts), bool)
    if len(pt) > 1:
        same_jet = jet_of[1:] == jet_of[:-1]
        np.logical_or.at(rising, jet_of[1:][same_jet], pt[1:][same_jet] > pt[:-1][same_jet])
    return jets, {"pt_clamped": clamped, "jets_not_pt_ordered": int(rising.sum())}


# --------------------------------------------------------------------------- shards
def write_jet_frame_shards(out_dir, batches, *, classes, source: dict, tokens: dict | None = None,
                           max_particles: int = 128, jets_per_shard: int = 10000, chunk_size: int = 1000,
                           split: str = GENERATED_SPLIT) -> Manifest:
    """Write an iterable of JetArrays (jet-frame, physical) as a shard set; returns its manifest."""
    out_dir = Path(out_dir)
    manifest = Manifest(source={**source, "frame": JET_FRAME}, particle_features=list(KINEMATIC_FEATURES),
                        jet_features=list(JET_FEATURES), classes=list(classes), max_particles=int(max_particles),
                        chunk_size=chunk_size, created_by=creation_info(), tokens=tokens)
    writer, index, in_shard = None, 0, 0
    try:
        for jets in batches:
            while len(jets):
                if writer is None:
                    writer = ShardWriter(out_dir, f"{split}/shard-{index:06d}.tar", manifest.particle_features,
                                         manifest.jet_features, len(classes), chunk_size=chunk_size)
                take = min(len(jets), jets_per_shard - in_shard)
                writer.write(jets.select(np.arange(take)) if take < len(jets) else jets)
                jets = jets.select(np.arange(take, len(jets)))
                in_shard += take
                if in_shard >= jets_per_shard:
                    manifest.add_shard(split, writer.close())
                    manifest.save(out_dir)
                    writer, index, in_shard = None, index + 1, 0
        if writer is not None:
            manifest.add_shard(split, writer.close())
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    manifest.save(out_dir)
    return manifest


def _conditioning(model, cfg, manifest, n_jets, class_name, multiplicity, seed, limit):
    """(labels (n,) | None, multiplicity (n,) | None, class names, how they were chosen); multiplicities
    drawn from the training data are clipped to the length limit."""
    mode = model.model_cfg.conditioning
    classes = list(manifest.classes) if manifest is not None else None
    if class_name is not None and mode != "class":
        raise GenerationError(f"--class {class_name}: the model was trained without class conditioning "
                              f"(model.conditioning={mode!r})")
    if multiplicity is not None and mode != "multiplicity":
        raise GenerationError(f"--multiplicity {multiplicity}: the model was trained without multiplicity conditioning "
                              f"(model.conditioning={mode!r})")
    rng = np.random.default_rng(seed)
    if mode == "class":
        n_classes = model.backbone.cond_emb.num_embeddings
        if classes is None or len(classes) != n_classes:
            classes = [f"class{i}" for i in range(n_classes)]
        if class_name is not None:
            if class_name in classes:
                index = classes.index(class_name)
            elif str(class_name).isdigit() and int(class_name) < n_classes:
                index = int(class_name)
            else:
                raise GenerationError(f"--class {class_name}: unknown; the model's classes are {classes}")
            return np.full(n_jets, index, np.int64), None, classes, f"requested {classes[index]}"
        weights = np.ones(n_classes)
        if manifest is not None and manifest.classes == classes and cfg.data.train_split in manifest.splits:
            counts = np.asarray(manifest.class_counts(cfg.data.train_split), np.float64)
            if counts.sum() > 0:
                weights = counts
        labels = rng.choice(n_classes, size=n_jets, p=weights / weights.sum())
        return labels.astype(np.int64), None, classes, "drawn with the training class fractions"
    if mode == "multiplicity":
        max_p = model.model_cfg.max_particles
        if multiplicity is not None:
            if not 1 <= int(multiplicity) <= max_p:
                raise GenerationError(f"--multiplicity {multiplicity}: more particles than the model's maximum "
                                      f"{max_p} (model.max_particles), or < 1")
            if int(multiplicity) > limit:
                raise GenerationError(f"--multiplicity {multiplicity} > --max-length {limit}: such jets would be cut")
            return None, np.full(n_jets, int(multiplicity), np.int64), ["generated"], "requested"
        if manifest is None:
            raise GenerationError("the model is multiplicity-conditioned and its training data is unreachable: pass "
                                  "--multiplicity N")
        seen = _training_multiplicities(cfg, manifest)
        return None, rng.choice(np.clip(seen, 1, min(max_p, limit)), size=n_jets).astype(np.int64), ["generated"], \
            f"drawn from the training data's multiplicities (clipped to {min(max_p, limit)})"
    return None, None, ["generated"], "unconditional"


def _training_multiplicities(cfg, manifest, limit: int = 100_000) -> np.ndarray:
    from .data.reader import iterate_jets

    split = cfg.data.train_split if cfg.data.train_split in manifest.splits else next(iter(manifest.splits))
    values, seen = [], 0
    for chunk in iterate_jets(cfg.data.path, split):
        values.append(np.minimum(chunk.multiplicity, cfg.data.max_particles))
        seen += len(chunk)
        if seen >= limit:
            break
    return np.concatenate(values)


def generate_to_shards(
    checkpoint_dir,
    out_dir,
    n_jets: int,
    *,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    class_name: str | None = None,
    multiplicity: int | None = None,
    max_length: int | None = None,
    min_length: int = 1,
    device: str = "cpu",
    tokenizer_dir=None,
    jets_per_shard: int = 10000,
    use_cache: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Generate `n_jets` jets from a pre-training checkpoint into the shard set OUT (split
    `generated`). Returns its manifest. See the module docstring for the output conventions."""
    from .tokenizer.model import load_tokenizer
    from .tokenizer.tokenize import tokens_description

    out_dir = Path(out_dir)
    if (out_dir / Manifest.FILENAME).exists() or (out_dir / GENERATED_SPLIT).exists():
        if not overwrite:
            raise GenerationError(f"{out_dir} already holds generated jets; choose a new --out or pass --overwrite")
        (out_dir / Manifest.FILENAME).unlink(missing_ok=True)
        shutil.rmtree(out_dir / GENERATED_SPLIT, ignore_errors=True)
    if n_jets < 1:
        raise GenerationError(f"--n-jets must be >= 1, got {n_jets}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("--device cuda: no CUDA GPU here")
    cfg, model, checkpoint = load_pretrain_checkpoint(checkpoint_dir, device=device)
    manifest = training_manifest(cfg)
    tok_dir = resolve_tokenizer_dir(cfg, tokenizer_dir, manifest)
    tokenizer = load_tokenizer(tok_dir, device=device)
    check_tokenizer(model, cfg, tokenizer, tok_dir, manifest)
    recorded = [Path(p).resolve() for p in (getattr(cfg.tokenizer, "checkpoint", None),
                                            (manifest.tokens or {}).get("tokenizer") if manifest is not None else None) if p]
    if recorded and Path(tok_dir).resolve() not in recorded:
        warnings.warn(f"tokenizer {tok_dir} is not the one recorded for this checkpoint ({recorded[0]}); codebook size "
                      "and features match, but if it was trained separately its token ids mean other particles",
                      stacklevel=2)
    fmap = FeatureMap(tokenizer.preprocessing, Preprocessing.from_config(cfg.data.features), str(tok_dir)) \
        if model.model_cfg.input_mode == "continuous" else None
    limit = model.model_cfg.max_particles if max_length is None else int(max_length)
    labels, mult, classes, how = _conditioning(model, cfg, manifest, n_jets, class_name, multiplicity, seed, limit)
    L = check_request(model, max_length=max_length, min_length=min_length, labels=labels, multiplicity=mult)
    run = find_run_record(checkpoint)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_length": L, "min_length": min_length,
                "batch_size": batch_size, "use_cache": use_cache, "device": str(device),
                "class": class_name, "multiplicity": multiplicity, "conditioning": model.model_cfg.conditioning,
                "conditioning_values": how}
    source = {"kind": "generated", "checkpoint": str(checkpoint.resolve()), "tokenizer": str(Path(tok_dir).resolve()),
              "sampling": sampling, "seed": seed, "input_mode": model.model_cfg.input_mode,
              "mlflow": run, "experiment": cfg.tracking.experiment, "name": cfg.name}

    from tqdm.auto import tqdm

    bar = tqdm(total=n_jets, unit="jet", desc="generate", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = {"n_jets": 0, "n_stopped": 0, "n_length_limit": 0, "pt_clamped": 0, "jets_not_pt_ordered": 0}
    started = time.perf_counter()

    def batches():
        # a few model batches per write, so progress, memory and shard writes stay smooth
        group = max(batch_size, min(4 * batch_size, jets_per_shard))
        for first in range(0, n_jets, group):
            n = min(group, n_jets - first)
            rows = slice(first, first + n)
            generated = generate_jets(
                model, tokenizer, n, batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                max_length=L, min_length=min_length, generator=generator,
                labels=None if labels is None else labels[rows], multiplicity=None if mult is None else mult[rows],
                use_cache=use_cache, input_features=fmap, progress=bar,
            )
            jets, info = to_physical(generated, tokenizer, labels=np.zeros(n, np.int64) if labels is None else labels[rows])
            counts["n_jets"] += n
            counts["n_stopped"] += int(generated.stopped.sum())
            counts["n_length_limit"] += int((~generated.stopped).sum())
            for key, value in info.items():
                counts[key] += value
            bar.set_postfix(particles=f"{int(generated.lengths.float().mean())}/jet", refresh=False)
            yield jets

    try:
        result = write_jet_frame_shards(
            out_dir, batches(), classes=classes, source=source, tokens=tokens_description(tokenizer, tok_dir),
            max_particles=L, jets_per_shard=jets_per_shard,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    result.source.update(counts, seconds=round(seconds, 3), jets_per_s=round(n_jets / max(seconds, 1e-9), 2))
    result.save(out_dir)
    return result


# --------------------------------------------------------------------------- command line
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="pre-training export (run_dir/final: model.safetensors + config.yaml) or its run dir")
    parser.add_argument("--n-jets", type=int, required=True, metavar="N", help="jets to generate")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard set (split 'generated')")
    parser.add_argument("--batch-size", type=int, default=256, metavar="B", help="jets sampled together (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most probable tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: smallest set holding P")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="class of every jet (class-conditioned models; default: drawn like the training data)")
    parser.add_argument("--multiplicity", type=int, default=None, metavar="N",
                        help="particles per jet (multiplicity-conditioned models; default: drawn from the training data)")
    parser.add_argument("--max-length", type=int, default=None, metavar="L",
                        help="length limit in particles (default and maximum: model.max_particles)")
    parser.add_argument("--min-length", type=int, default=1, metavar="L",
                        help="stop is not sampled before L particles (default 1; = --max-length forces the length)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer directory (default: config tokenizer.checkpoint or the data manifest's)")
    parser.add_argument("--jets-per-shard", type=int, default=10000, help="jets per output shard (default 10000)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (reference, slow)")
    parser.add_argument("--overwrite", action="store_true", help="replace jets already generated in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_generate(args) -> int:
    from .config import ConfigError
    from .tokenizer.model import TokenizerMismatchError

    try:
        manifest = generate_to_shards(
            args.checkpoint, args.out, args.n_jets, batch_size=args.batch_size, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, class_name=args.class_name,
            multiplicity=args.multiplicity, max_length=args.max_length, min_length=args.min_length, device=args.device,
            tokenizer_dir=args.tokenizer, jets_per_shard=args.jets_per_shard, use_cache=not args.no_cache,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (GenerationError, TokenizerMismatchError, ConfigError, DataError, FileNotFoundError) as error:
        print(f"jetfm: error: {error}", file=sys.stderr)
        return 2
    s = manifest.source
    print(f"{args.out}: {s['n_jets']} jets ({s['n_stopped']} stopped, {s['n_length_limit']} at the length limit "
          f"{s['sampling']['max_length']}) in {s['seconds']:.1f} s, {s['jets_per_s']:.1f} jets/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfm generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
