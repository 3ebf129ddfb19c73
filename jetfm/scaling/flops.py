"""Analytic FLOPs of one pre-training step, from the model's shapes and the batch's multiplicities.

    shapes = ModelShapes.from_model(model)                      # or .from_config(cfg.model, vocab, F)
    count = step_flops(shapes, batch.seqlens, objective="joint", mask_fraction=0.4)
    count.total, count.forward, count.parts                      # FLOPs (1 multiply-add = 2 FLOPs)
    meter = ComputeMeter.for_model(model)                        # a run's cumulative FLOPs, particles, jets

What is counted, and why (the conventions of docs/SCALING.md):

- Matrix products only (Linear layers, attention's two products, the vocabulary projection),
  2 FLOPs per multiply-add, as `torch.utils.flop_counter` and the scaling-law literature count.
  LayerNorm, GELU, softmax, dropout, cross-entropy and embedding look-ups are not counted.
- Backward = 2 x forward for every product (gradient of the input + of the weight), except the
  continuous input projection, whose input needs no gradient (weight gradient only: 1 x).
- Rows are what the model really computes: NTP runs the backbone and its head over the T + B
  positions [start, p1..pn] and projects every one of them to the vocabulary (every target
  position, stop included); MPM runs the backbone over the T - M unmasked particles only, its
  head over all T particles (mask vectors in place), and projects the M masked particles only;
  joint does both passes. M = sum over jets of `masked_count(n, mask_fraction)`: the mask is
  random, its size per jet is not, so the count is exact for any draw.
- Attention by the real lengths (`attention="useful"`, the default): a bidirectional pass
  attends L^2 (query, key) pairs per jet, a causal pass L (L + 1) / 2 — the pairs a causal
  kernel that skips masked blocks (flash-attn varlen, GPU) actually computes, up to its block
  granularity, and exactly the pairs jetfm's C kernel on CPU (`model.attention: auto`) computes. This is the number a scaling study wants: it does not change with the kernel.
- `attention="padded"` instead counts what jetfm's CPU SDPA path (`model.attention: sdpa`) executes when it runs the
  plain (math) kernel: jets grouped into length buckets, each bucket padded to its longest jet,
  and the full N^2 square computed per jet for causal and bidirectional passes alike. The
  bucket layout is taken from `jetfm.models.attention.Packing` itself. The ratio padded/useful
  is the attention work the CPU path wastes; the test compares this mode with FlopCounterMode.

Legend: T particles in the batch, B jets, M masked particles, D model dim, V vocabulary,
Hm MLP hidden width, L a jet's sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from jetfm.models.attention import Packing
from jetfm.models.objectives import masked_count

ATTENTION_MODES = ("useful", "padded")
OBJECTIVES = ("ntp", "mpm", "joint")


@dataclass(frozen=True)
class ModelShapes:
    """The matrix shapes of a pre-training model that its FLOPs depend on."""

    dim: int
    num_blocks: int
    head_blocks: int
    mlp_hidden: int
    head_mlp_hidden: int
    vocab_size: int
    num_features: int | None
    """Continuous input width F; None in token mode (an embedding look-up costs no product)."""

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, num_features: int | None) -> "ModelShapes":
        D = int(model_cfg.dim)
        return cls(
            dim=D, num_blocks=int(model_cfg.num_blocks), head_blocks=int(model_cfg.head_blocks),
            mlp_hidden=int(round(model_cfg.mlp_ratio * D)), head_mlp_hidden=int(round(model_cfg.head_mlp_ratio * D)),
            vocab_size=int(vocab_size),
            num_features=int(num_features) if model_cfg.input_mode == "continuous" else None,
        )

    @classmethod
    def from_model(cls, model) -> "ModelShapes":
        """Shapes of a built `PretrainModel` (read from its real modules, not from the config)."""
        backbone = model.backbone
        block = backbone.stack.blocks[0]
        head = (model.ntp or model.mpm).head
        num_features = backbone.input_proj.in_features if hasattr(backbone, "input_proj") else None
        return cls(
            dim=block.qkv.in_features, num_blocks=len(backbone.stack.blocks), head_blocks=len(head.stack.blocks),
            mlp_hidden=block.fc1.out_features, head_mlp_hidden=head.stack.blocks[0].fc1.out_features,
            vocab_size=head.out.out_features, num_features=num_features,
        )

    def block_row_flops(self, mlp_hidden: int) -> int:
        """Forward FLOPs of one block's Linear layers per row: qkv (D -> 3D), proj, fc1, fc2."""
        D = self.dim
        return 2 * (3 * D * D + D * D + 2 * D * mlp_hidden)

    def row_flops(self) -> int:
        """Forward FLOPs per row of the backbone's and one head's Linear layers, the weight part of
        the classic '2N per token' (used by the 6ND cross-check)."""
        return self.num_blocks * self.block_row_flops(self.mlp_hidden) + self.head_blocks * self.block_row_flops(
            self.head_mlp_hidden)


@dataclass
class FlopCount:
    """FLOPs of one step by part: {part: (forward, backward)}; `total` = forward + backward."""

    parts: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, part: str, forward: float, backward_factor: float = 2.0) -> None:
        f, b = self.parts.get(part, (0.0, 0.0))
        self.parts[part] = (f + float(forward), b + backward_factor * float(forward))

    @property
    def forward(self) -> float:
        return sum(f for f, _ in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(b for _, b in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def as_dict(self) -> dict[str, float]:
        out = {f"{part}/{kind}": value for part, (f, b) in self.parts.items() for kind, value in (("fwd", f), ("bwd", b))}
        return {**out, "forward": self.forward, "backward": self.backward, "total": self.total}


def _attention_pairs(lengths: torch.Tensor, *, causal: bool, attention: str, max_seqlen: int | None) -> float:
    """(query, key) pairs one attention layer computes over jets of these lengths (see module doc)."""
    L = lengths.long()
    if attention == "useful":
        return float((L * (L + 1) // 2).sum() if causal else (L * L).sum())
    cu = torch.cat([L.new_zeros(1), L.cumsum(0)]).to(torch.int32)
    bound = int(L.max()) if max_seqlen is None else int(max_seqlen)
    packing = Packing(cu, max(bound, 1), int(L.sum()), buckets=None)
    layout = packing.bucketing
    if layout is None:
        return float(packing.num_seqs * packing.max_seqlen ** 2)
    return float(sum(part.num_seqs * part.max_seqlen ** 2 for part in layout[2]))


def _stack(count: FlopCount, shapes: ModelShapes, name: str, blocks: int, mlp_hidden: int, rows: int, pairs: float) -> None:
    if blocks == 0:
        return
    count.add(f"{name}/linear", blocks * rows * shapes.block_row_flops(mlp_hidden))
    count.add(f"{name}/attention", blocks * 4 * shapes.dim * pairs)  # q k^T and p v, 2 D each per pair


def step_flops(
    shapes: ModelShapes,
    lengths: torch.Tensor,
    *,
    objective: str,
    mask_fraction: float = 0.4,
    attention: str = "useful",
    max_seqlen: int | None = None,
    backward: bool = True,
) -> FlopCount:
    """FLOPs of one forward (+ backward) pass of the pre-training model over jets of multiplicities
    `lengths` (B,). `max_seqlen` is the batch's bound N (only `attention="padded"` uses it: an
    unbucketed batch pads to it). backward=False counts the forward pass only (validation)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    L = torch.as_tensor(lengths).long().cpu()
    if L.ndim != 1 or (L.numel() and int(L.min()) < 0):
        raise ValueError(f"lengths must be a 1-d tensor of multiplicities >= 0, got shape {tuple(L.shape)}")
    B, T = L.numel(), int(L.sum())
    D, V, F = shapes.dim, shapes.vocab_size, shapes.num_features
    count = FlopCount()
    bw = 1.0 if backward else 0.0
    if objective in ("ntp", "joint"):
        rows = T + B  # [start, p1..pn] per jet
        ntp_max = None if max_seqlen is None else max_seqlen + 1
        pairs = _attention_pairs(L + 1, causal=True, attention=attention, max_seqlen=ntp_max)
        if F:
            count.add("ntp/input", 2 * T * F * D, 1.0 * bw)  # weight gradient only: x needs none
        _stack(count, shapes, "ntp/backbone", shapes.num_blocks, shapes.mlp_hidden, rows, pairs)
        _stack(count, shapes, "ntp/head", shapes.head_blocks, shapes.head_mlp_hidden, rows, pairs)
        count.add("ntp/logits", 2 * rows * D * V)
    if objective in ("mpm", "joint"):
        M_B = masked_count(L, mask_fraction)
        keep_B = L - M_B
        M = int(M_B.sum())
        if F:
            count.add("mpm/input", 2 * (T - M) * F * D, 1.0 * bw)
        keep_pairs = _attention_pairs(keep_B, causal=False, attention=attention, max_seqlen=None)
        _stack(count, shapes, "mpm/backbone", shapes.num_blocks, shapes.mlp_hidden, T - M, keep_pairs)
        pairs = _attention_pairs(L, causal=False, attention=attention, max_seqlen=max_seqlen)
        _stack(count, shapes, "mpm/head", shapes.head_blocks, shapes.head_mlp_hidden, T, pairs)
        count.add("mpm/logits", 2 * M * D * V)
    if not backward:
        count.parts = {k: (f, 0.0) for k, (f, _) in count.parts.items()}
    return count


def batch_flops(model, batch, *, attention: str = "useful", backward: bool = True) -> FlopCount:
    """`step_flops` of a built `PretrainModel` on a `JetBatch` (one micro-batch, one process)."""
    obj = model.objective_cfg
    return step_flops(ModelShapes.from_model(model), batch.seqlens, objective=obj.name,
                      mask_fraction=obj.mask_fraction, attention=attention, max_seqlen=batch.max_seqlen,
                      backward=backward)


class ComputeMeter:
    """A run's cumulative training compute: FLOPs, particles and jets seen, carried in checkpoints.

        meter = ComputeMeter.for_model(model)          # the unwrapped PretrainModel
        flops = meter.count(batch.seqlens)             # one micro-batch on this process (no host sync on CPU)
        meter.add(flops, particles, jets, steps=1)     # totals summed over processes
        state = meter.state_dict(); meter.load_state_dict(state)   # resume continues the sums
        meter.summary()                                # summary.json's `scaling` block

    `count` uses the useful-attention convention of `step_flops`. A model that is not a
    pre-training model (a classifier, the tokenizer) gets a meter without shapes: it counts
    particles and jets, and its FLOPs stay None. The sums are floats (exact to 2^53 ~ 9e15
    particles; FLOPs beyond that lose integer precision, not meaning).
    """

    def __init__(self, shapes: ModelShapes | None, objective: str | None, mask_fraction: float = 0.0):
        if shapes is not None and objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.shapes, self.objective, self.mask_fraction = shapes, objective, float(mask_fraction)
        self.flops = self.particles = self.jets = 0.0
        self.steps = 0
        self.unique_jets: int | None = None
        self.N = self.N_total = None
        self.size = self.budget = None

    @classmethod
    def for_model(cls, model) -> "ComputeMeter":
        obj = model.objective_cfg
        return cls(ModelShapes.from_model(model), obj.name, obj.mask_fraction)

    @classmethod
    def for_run(cls, model, *, unique_jets: int, parameters: tuple[int, int], size: str | None = None,
                budget: str | float | None = None) -> "ComputeMeter":
        """The trainer's meter: FLOPs for a pre-training model, particles and jets for any; the run's
        static numbers (N, N_total, unique jets, ladder size, budget) for its params and summary."""
        pretrain = getattr(model, "objective_cfg", None) is not None and hasattr(model, "backbone")
        meter = cls.for_model(model) if pretrain else cls(None, None)
        meter.unique_jets = int(unique_jets)
        meter.N, meter.N_total = (int(n) for n in parameters)
        meter.size, meter.budget = size, (float(budget) if budget not in (None, "") else None)
        return meter

    def count(self, seqlens: torch.Tensor) -> float:
        """Forward + backward FLOPs of one micro-batch of jets with these multiplicities (0 without shapes)."""
        if self.shapes is None:
            return 0.0
        return step_flops(self.shapes, seqlens, objective=self.objective, mask_fraction=self.mask_fraction).total

    def add(self, flops: float, particles: float, jets: float, steps: int = 1) -> None:
        """Totals of `steps` optimizer steps (all micro-batches, all processes)."""
        self.flops += float(flops)
        self.particles += float(particles)
        self.jets += float(jets)
        self.steps += int(steps)

    @property
    def epochs(self) -> float | None:
        """Passes over the training (sub)set: the repetition of the data."""
        return self.jets / self.unique_jets if self.unique_jets else None

    def metrics(self) -> dict[str, float]:
        """The cumulative numbers, logged as MLflow metrics each log step."""
        out = {"particles_seen": self.particles, "jets_seen": self.jets}
        if self.shapes is not None:
            out["flops"] = self.flops
        if self.epochs is not None:
            out["epochs"] = self.epochs
        return out

    def params(self) -> dict:
        """The static numbers, logged once as MLflow params."""
        out = {"scaling.N": self.N, "scaling.N_total": self.N_total, "scaling.unique_jets": self.unique_jets,
               "scaling.size": self.size, "scaling.budget": self.budget}
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> dict:
        """summary.json's `scaling` block (what jetfm/scaling/report.py reads). unique_particles is
        the subset's jets times the mean multiplicity seen (after truncation): exact in
        expectation, not counted particle by particle."""
        mean_multiplicity = self.particles / self.jets if self.jets else None
        return {
            "N": self.N, "N_total": self.N_total, "size": self.size, "budget": self.budget,
            "objective": self.objective, "steps": self.steps,
            "flops": self.flops if self.shapes is not None else None,
            "particles_seen": self.particles, "jets_seen": self.jets, "unique_jets": self.unique_jets,
            "unique_particles": self.unique_jets * mean_multiplicity if self.unique_jets and mean_multiplicity else None,
            "epochs": self.epochs,
        }

    def state_dict(self) -> dict:
        return {"flops": self.flops, "particles": self.particles, "jets": self.jets, "steps": self.steps,
                "objective": self.objective}

    def load_state_dict(self, state: dict) -> None:
        if state.get("objective") != self.objective:
            raise ValueError(f"compute state of objective {state.get('objective')!r} cannot continue a {self.objective!r} run")
        self.flops, self.particles, self.jets = (float(state[k]) for k in ("flops", "particles", "jets"))
        self.steps = int(state["steps"])
