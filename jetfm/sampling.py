"""Autoregressive sampling of jets from a pre-trained NTP model, with KV caches.

    cfg, model, _ = jetfm.artifacts.exports.load_pretrain("runs/joint/final")
    tokenizer = jetfm.tokenizer.model.load_tokenizer("runs/tokenizer/final")
    tokens, cu_seqlens, features = generate_jets(model, tokenizer, 1000, batch_size=256)

`jetfm generate` (jetfm/generate.py) is the command around it: it writes the jets as a shard set.

Sampling (docs/METHOD.md §4). Every jet starts from the start position and samples one token per
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
step re-runs the prefix. On CPU in fp32 the caches are position-major and every stack's blocks
run in one compiled call on jetfm's own fused ops (models/attention.py, KVCache; SDPA and Python
block steps where no C++ compiler is at hand), the vocabulary projection writes into one padded
logits buffer per batch through the same compiled linear layer, and a batch's jets are split
into groups generated side by side on threads (`shards`): same mathematics, same tokens for a
seed (tests/test_generate_fast.py). Measured at the reference size, batch 64, length 100, two
threads: 46.6 jets/s with the Python block steps, 83.7 with all of this (docs/SPEED.md).
`use_cache=False` is the reference algorithm for tests and the
benchmark: every step re-decodes the whole prefix and re-runs the backbone on it (O(n²); it
projects only the last position onto the vocabulary, which makes it a little faster than the
reference's full-logits pass). Both paths draw the same random numbers, so with the same seed
they sample the same tokens (tests/test_generate_jets.py).

Legend: B jets in a batch (b: live ones), L length limit (particles), V vocabulary, F features,
T packed particles.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .data.features import FeatureTransform, Preprocessing, feature_spec


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


# --------------------------------------------------------------------------- feature map
class FeatureMap:
    """Tokenizer-preprocessed features (B, F_tok) -> the model's preprocessed inputs (B, F_model), in torch.

    Identity (no work) when both name the same features with the same transforms; otherwise
    each model feature is looked up by name, inverted to physical units with the tokenizer's
    transform and re-transformed with the model's (data.features). Raises
    TokenizerMismatchError when the model needs a feature the tokenizer does not decode."""

    def __init__(self, tokenizer_pre: Preprocessing, model_pre: Preprocessing, where: str = "tokenizer"):
        from .tokenizer.model import TokenizerMismatchError

        tok_spec, model_spec = feature_spec(tokenizer_pre), feature_spec(model_pre)
        missing = [n for n in model_spec if n not in tok_spec]
        if missing:
            raise TokenizerMismatchError(
                f"the checkpoint's continuous inputs (data.features {list(model_spec)}) need {missing}, which "
                f"{where} does not decode (it decodes {list(tok_spec)})"
            )
        self.identity = list(tok_spec) == list(model_spec) and all(
            FeatureTransform(**tok_spec[n]).same_as(FeatureTransform(**model_spec[n])) for n in model_spec)
        self.columns = [list(tok_spec).index(n) for n in model_spec]
        self.steps = [(FeatureTransform(**tok_spec[n]), FeatureTransform(**model_spec[n])) for n in model_spec]

    def __call__(self, x_BF: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x_BF
        out = []
        for column, (tok, mod) in zip(self.columns, self.steps):
            out.append(mod.forward(tok.inverse(x_BF[:, column])))
        return torch.stack(out, dim=1)


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
                    temperature: float, top_k: int | None, top_p: float | None, kernel=None) -> torch.Tensor:
    """sample_tokens on a float32 (B, V) tensor that it overwrites (no (B, V) temporaries on the
    common path: temperature, masks and exp run in place). `kernel` (`_sampling_kernel`): the
    softmax and the inverse CDF after the masks in one compiled call per batch, same rule."""
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
    if kernel is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1:
        return kernel.sample_rows(logits, u_B.float().contiguous(), CDF_BLOCK)
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


def _sampling_kernel(model, device):
    """The compiled sampler (`kernels/kv_decode.cpp` sample_rows: max, exp, block sums and both
    searches of `_sample_inplace` in one call, a quarter of its time at 32 x 8,320 logits) where the
    model runs jetfm's CPU kernels (model.attention auto, on CPU); None elsewhere: torch ops. Cached
    and recompute generation take the same one, so their tokens stay comparable."""
    from .models.attention import AttentionBackend, KVCache

    if torch.device(device).type != "cpu" or AttentionBackend(model.model_cfg.attention) is not AttentionBackend.AUTO:
        return None
    return KVCache._kernel()  # the KV cache's compiled kernels (None without a compiler)


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
        # The vocabulary projection writes into one logits buffer per batch, V padded to whole
        # CDF blocks: the head's weight transposed to (D, V_pad) with zero columns past V, whose
        # logits are set to -inf (probability 0, as the zero padding of the sampler's block sums).
        # Why: a fresh (B, V) result per step and the sampler's padded copy of it cost as much
        # as the projection itself (page faults on 2 MB, a fill and a copy); the transposed
        # weight makes the (B, D) @ (D, V_pad) product ~30% faster than linear's (V, D) weight.
        # The padded weight (and its packed copy) are made once while the weight is unchanged
        # (derived_from), not for every batch and shard.
        from .models.attention import derived_from

        weight = model.ntp.head.out.weight
        self.vocab = V = weight.shape[0]
        V_pad = -(-V // CDF_BLOCK) * CDF_BLOCK

        def padded():
            weight_DV = weight.detach().new_zeros(weight.shape[1], V_pad)
            weight_DV[:, :V] = weight.detach().t()
            return weight_DV

        self.weight_DV = derived_from(weight, "vocab_padded_DV", padded)
        self.logits_BV = weight.new_empty(batch, V_pad)
        # the compiled small-batch linear layer (kernels/kv_decode.cpp) where the cache runs the
        # compiled kernels: 1.7x faster than torch.mm at 32 rows, on the packed padded weight
        self.project = None
        if self.cache.position_major and weight.dtype == torch.float32:
            kernel = self.cache._kernel()
            self.project = kernel.linear_into
            self.packed_weight = derived_from(weight, "vocab_padded_packed",
                                              lambda: kernel.pack_weight(self.weight_DV.t().contiguous()))
            self.no_bias = torch.empty(0)

    def logits(self, t: int, multiplicity_b, labels_b) -> torch.Tensor:
        """(b, V) next-token logits (a view of the padded buffer)."""
        return self.padded_logits(t, multiplicity_b, labels_b)[:, : self.vocab]

    def padded_logits(self, t: int, multiplicity_b, labels_b) -> torch.Tensor:
        """(b, V_pad) next-token logits, -inf past V: what the sampler takes without padding."""
        kwargs = dict(multiplicity_B=multiplicity_b, labels_B=labels_b)
        if t > 0:
            kwargs["x_BF" if self.continuous else "tokens_B"] = self.next_input
        z_bD = self.model.ntp_features_step(self.cache, **kwargs)
        logits_bV = self.logits_BV[: z_bD.shape[0]]  # the first b rows: contiguous
        if self.project is not None and z_bD.dtype == torch.float32:
            self.project(z_bD.contiguous(), self.packed_weight, self.no_bias, logits_bV)
        else:
            torch.mm(z_bD.to(self.weight_DV.dtype), self.weight_DV, out=logits_bV)
        logits_bV[:, self.vocab:] = -math.inf
        return logits_bV

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

    padded_logits = logits  # (b, V): the sampler pads by itself

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
    shards: int | None = None,
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
    progress: a tqdm-like object updated with the number of finished jets (at every "all stopped" check).
    shards: on CPU, each batch's jets are split into this many groups generated side by side, one
    per thread, each with single-threaded ops (default: torch's thread count, at most one group
    per 16 jets). Why: at a few dozen jets per step the matrices are small and threading each op
    spent ~18% of the time in OpenMP barriers, while jets are independent. Their random numbers
    are drawn before the split, so the tokens do not depend on it. 1 = one group (GPU: always).
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

        def run(part: slice):
            stepper = stepper_cls(model, tokenizer, fmap, part.stop - part.start, L, device)
            return _generate_batch(
                stepper, model, u_BL[part], L=L, min_length=min_length, temperature=temperature, top_k=top_k,
                top_p=top_p, labels_B=None if labels_N is None else labels_N[rows][part],
                mult_B=None if mult_N is None else mult_N[rows][part], sync_every=sync_every, progress=progress,
            )

        tok_BL, len_B, feat_BLF = _run_sharded(run, B, _shard_count(shards, B, device))
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
    lengths_N = torch.cat(lengths)
    cu = torch.zeros(n_jets + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths_N, 0)
    return GeneratedJets(
        tokens=torch.cat(tokens), cu_seqlens=cu, features=torch.cat(features), stopped=torch.cat(stopped),
        labels=None if labels_N is None else labels_N.cpu(), multiplicity=None if mult_N is None else mult_N.cpu(),
        seconds=time.perf_counter() - started,
    )


MIN_JETS_PER_SHARD = 16


def _shard_count(shards: int | None, batch: int, device: torch.device) -> int:
    if device.type != "cpu":
        return 1
    if shards is None:
        shards = torch.get_num_threads()
    return max(1, min(int(shards), batch // MIN_JETS_PER_SHARD))


def _run_sharded(run, batch: int, shards: int):
    """run(slice of the batch's jets) -> (tokens (b, L), lengths (b,), features (b, L, F) | None), over
    `shards` contiguous groups on as many threads with single-threaded torch ops (the ops release
    the GIL), concatenated back in order."""
    if shards <= 1:
        return run(slice(0, batch))
    from .models.thread_split import map_on_threads

    bounds = [batch * i // shards for i in range(shards + 1)]
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    results = map_on_threads(run, parts, op_threads=1, name="jetfm-generate")
    tokens, lengths, features = zip(*results)
    return torch.cat(tokens), torch.cat(lengths), None if features[0] is None else torch.cat(features)


def _generate_batch(stepper, model, u_BL, *, L, min_length, temperature, top_k, top_p, labels_B, mult_B, sync_every,
                    progress=None):
    """One batch in lockstep: (tokens (B, L) with stop after the end, lengths (B,), features (B, L, F) | None).
    progress (tqdm-like) moves by the jets finished at each host sync, so a bar moves per jet."""
    B, device = u_BL.shape[0], u_BL.device
    reported = 0  # jets of this batch already counted on the progress bar
    stop = model.stop_id
    tokens_BL = torch.full((B, L), stop, dtype=torch.long, device=device)
    feats_BLF = None
    rows_b = slice(None)  # original rows of the live cache rows: all of them until the first compaction
    done_b = torch.zeros(B, dtype=torch.bool, device=device)
    kernel = _sampling_kernel(model, device)
    for t in range(L):
        logits_bV = stepper.padded_logits(t, mult_B, labels_B)  # V or V padded with -inf: same tokens
        tok_b = _sample_inplace(logits_bV.float(), u_BL[rows_b, t], stop_id=stop, allow_stop=t >= min_length,
                                temperature=temperature, top_k=top_k, top_p=top_p, kernel=kernel)  # ours to overwrite
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
        if progress is not None and B - live > reported:
            progress.update(B - live - reported)
            reported = B - live
        if live == 0:
            break
        if live <= 0.75 * done_b.numel():
            keep = torch.nonzero(~done_b).squeeze(1)
            stepper.compact(keep)
            rows_b = keep if isinstance(rows_b, slice) else rows_b[keep]
            done_b = done_b[keep]
            labels_B = None if labels_B is None else labels_B[keep]
            mult_B = None if mult_B is None else mult_B[keep]
    if progress is not None and B > reported:
        progress.update(B - reported)
    is_stop_BL = tokens_BL == stop
    lengths_B = torch.where(is_stop_BL.any(1), is_stop_BL.int().argmax(1), torch.full((B,), L, device=device))
    return tokens_BL, lengths_B.long(), feats_BLF


# --------------------------------------------------------------------------- conditioning
def choose_conditioning(model, cfg, manifest, n_jets, class_name, multiplicity, seed, limit):
    """The conditioning of `n_jets` jets as `jetfm generate` chooses it: (labels (n,) | None,
    multiplicity (n,) | None, class names, how they were chosen). Unrequested classes are drawn
    with the training class fractions, multiplicities from the training jets (clipped to the
    length limit); the messages name the command's options."""
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
