"""Processes and parallelism: the Accelerator the trainer runs on, and how to launch it.

    accelerator = make_accelerator(cfg)     # DDP | FSDP2 | DeepSpeed, from `accelerate launch`
    describe(accelerator)                   # {"distributed_type": "FSDP", "num_processes": 2, ...}

Which parallelism is used is decided by the launcher (configs/accelerate/*.yaml), never by the
jetfm config; precision and gradient accumulation come from the jetfm config
(train.precision, train.grad_accum_steps), so one experiment config runs under every launcher.

On CPU (development machines, tests) — `launch_command()` builds these:

    DDP        ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 ...
               (or --multi_gpu instead of the file; plain --cpu silently runs ONE process)
    FSDP2      ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml ...
    DeepSpeed  DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml ...
               (deepspeed_zero3.yaml for ZeRO-3; docs/DISTRIBUTED.md has the details)

Two accelerate behaviours on CPU that this module corrects or refuses, so a run never trains
under another parallelism than the one asked for:
- FSDP: accelerate resolves a CPU run to MULTI_CPU (plain DDP) even with an FSDP config.
  torch's fully_shard itself works on CPU with gloo, so `make_accelerator` switches the state to
  FSDP2 when the launcher asked for FSDP (ACCELERATE_USE_FSDP=true) and the run is on CPU.
- DeepSpeed: ACCELERATE_USE_CPU=1 with --use_deepspeed silently gives DDP. Asked for
  DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) but not given it -> error naming DS_ACCELERATOR=cpu.
  With DS_ACCELERATOR=cpu, accelerate records 1 process and rank 0 on every process (DeepSpeed's
  own group is right): the rank and world size are copied from torch.distributed.

FSDP2 is applied here, not by accelerate (`shard_model`, before the optimizer is built):
fully_shard on every transformer block, then on the root, with an explicit MixedPrecisionPolicy —
bf16 parameters in compute under train.precision=bf16, fp32 gradient reduction and fp32 master
weights — identical on CPU and GPU. The tokenizer stage is refused under FSDP and DeepSpeed
(`check_stage`); docs/DISTRIBUTED.md says why and what was checked where.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType

from jetfm.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
#: Distributed types where every process holds the whole model (DDP-style replicas).
REPLICATED = {
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_MLU,
    DistributedType.MULTI_MUSA,
    DistributedType.MULTI_HPU,
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this process, with jetfm's precision and accumulation, checked."""
    _forget_previous_run()
    accelerator = Accelerator(
        mixed_precision=PRECISION[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # jetfm's schedule is defined per optimizer step; accelerate's default would step it
        # num_processes times per step
        step_scheduler_with_optimizer=False,
    )
    if _flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _switch_to_cpu_fsdp2(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fix_deepspeed_process_count(accelerator)
    if _flag("ACCELERATE_USE_DEEPSPEED") and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(
            f"the launcher asked for DeepSpeed but accelerate set up {accelerator.distributed_type.value}: on CPU "
            "launch with DS_ACCELERATOR=cpu and without ACCELERATE_USE_CPU=1 / --cpu"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): every process would train alone and write the same files. "
            "On CPU launch with ACCELERATE_USE_CPU=1 (DDP, FSDP) or DS_ACCELERATOR=cpu (DeepSpeed)"
        )
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum_steps:
        raise ConfigError(
            f"accelerate uses gradient_accumulation_steps={accelerator.gradient_accumulation_steps} (from the "
            f"launcher's environment) but the config says train.grad_accum_steps={cfg.train.grad_accum_steps}; "
            "set it in the jetfm config only"
        )
    check_stage(cfg, accelerator)
    if cfg.train.precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU (loss scaling); use bf16 on CPU")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if cfg.train.nan_policy == "skip":
            raise ConfigError(
                "train.nan_policy=skip is not available with DeepSpeed (its engine steps the optimizer inside "
                "backward); use nan_policy=stop"
            )
        configure_deepspeed(accelerator, cfg)
    return accelerator


def _forget_previous_run() -> None:
    """Several stages trained one after another in one process (e.g. `jetfm demo`): accelerate's
    state is a process-wide singleton that refuses a new precision, so a single-process caller
    starts from a clean one. (A multi-process launch trains one config; its state stays.)"""
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    if is_initialized() and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _switch_to_cpu_fsdp2(accelerator: Accelerator) -> None:
    """Turn accelerate's CPU fallback (MULTI_CPU = DDP) into the FSDP2 the launcher asked for.

    accelerate only enables FSDP for accelerator devices; fully_shard works on CPU with gloo.
    The FSDP plugin is built from the launcher's FSDP_* environment as accelerate would.
    """
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU is supported as FSDP2 only: set fsdp_version: 2 in the accelerate config")
    # both shared states: AcceleratorState re-reads PartialState's on every instantiation
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if accelerator.distributed_type != DistributedType.FSDP or not accelerator.is_fsdp2:
        raise RuntimeError("could not enable FSDP2 on CPU with this accelerate version; use a GPU or DDP")


def _fix_deepspeed_process_count(accelerator: Accelerator) -> None:
    """DeepSpeed without an accelerator device: accelerate records 1 process and rank 0 everywhere.

    DeepSpeed's own process group has the right world size (its batch check uses it), but with
    accelerate's count every process would think it is the main one (and write checkpoints and
    logs) and batch sizes would be computed for one process. Copy rank and world size from the
    initialised torch.distributed group into accelerate's shared state.
    """
    import torch.distributed as dist
    from accelerate.state import PartialState

    if not dist.is_initialized() or accelerator.num_processes == dist.get_world_size():
        return
    fix = {
        "num_processes": dist.get_world_size(),
        "process_index": dist.get_rank(),
        "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        "backend": dist.get_backend(),
    }
    PartialState._shared_state.update(fix)
    accelerator.state.__dict__.update(fix)
    if accelerator.process_index != dist.get_rank() or accelerator.num_processes != dist.get_world_size():
        raise RuntimeError("could not align accelerate's process count with DeepSpeed's on this accelerate version")


def configure_deepspeed(accelerator: Accelerator, cfg: Config) -> list[str]:
    """Write jetfm's batch geometry and clipping into the DeepSpeed config (before prepare).

    accelerate fills "auto" batch sizes from a prepared DataLoader, and jetfm prepares none (the
    reader shards by rank itself), so every value is set explicitly here. Returns notes about
    values of the json file that the jetfm config overrode.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"the DeepSpeed config has an '{key}' section: jetfm builds AdamW and the LR schedule from "
                "optim.* — remove it from the json"
            )
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    notes = []
    for key, value in wanted.items():
        old = ds.get(key)
        if old not in (None, "auto") and old != value:
            notes.append(f"DeepSpeed {key}: {old} in the json -> {value} from the jetfm config")
        ds[key] = value
    return notes


def check_stage(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse the tokenizer stage under a sharded launcher (FSDP, DeepSpeed): it needs DDP.

    The VQ-VAE edits its codebook outside the optimizer: the data-dependent initialisation and the
    dead-code replacement write parameters in place on every process. Under FSDP2 those parameters
    are DTensor shards (the edit fails or touches one shard), under ZeRO the optimizer's fp32
    partitions overwrite the edit at the next step. The tokenizer is small (it fits on any single
    device), so DDP loses nothing.
    """
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if cfg.stage == "tokenizer" and not cfg.builder and sharded:
        raise ConfigError(
            f"stage tokenizer cannot run under {accelerator.distributed_type.value}: its codebook initialisation and "
            "dead-code replacement edit the weights outside the optimizer, which sharded parameters undo. Train the "
            "tokenizer with DDP (accelerate launch --config_file configs/accelerate/ddp.yaml ...); it fits on one device"
        )


# --------------------------------------------------------------------------- FSDP2
#: Module classes that become their own FSDP2 unit: the transformer blocks of the backbone, of the
#: pre-training heads (both `Block`) and of the fine-tuning class-attention head.
BLOCK_CLASSES = ("jetfm.models.backbone:Block", "jetfm.finetune.model:ClassAttentionBlock")


def _block_types() -> tuple[type, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(m), name) for m, name in (p.split(":") for p in BLOCK_CLASSES))


def fsdp_policy(precision: str):
    """FSDP2's MixedPrecisionPolicy for train.precision: compute in bf16 (fp16) parameters, but
    reduce gradients in fp32 and keep the sharded master weights (what AdamW updates) in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=True)


def shard_blocks(model: nn.Module, precision: str, *, reshard_after_forward: bool = True, mesh=None) -> list[str]:
    """fully_shard every transformer block, then the root; returns the blocks' module names.

    One unit per block: a forward gathers one block's parameters at a time (and frees them after,
    reshard_after_forward), so peak memory is the sharded model + one block, and the next block's
    all-gather overlaps this one's compute. The root unit holds the rest (embeddings, norms,
    vocabulary projections). Parameters must all be fp32 (master weights).
    """
    from torch.distributed.fsdp import fully_shard

    policy = fsdp_policy(precision)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, _block_types())]
    for _, block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # the root is used again first in backward
    return [name for name, _ in blocks]


def shard_model(accelerator: Accelerator, model: nn.Module, cfg: Config) -> nn.Module:
    """Under FSDP: `shard_blocks` with jetfm's policy (call before building the optimizer, which
    must see the sharded parameters; accelerate.prepare then leaves the sharded model as it is).
    Any other parallelism: the model unchanged."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 2) != 2:
        raise ConfigError("jetfm supports FSDP2 only: set fsdp_version: 2 in the accelerate config")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 is not supported with FSDP (no sharded loss scaling); use bf16")
    shard_blocks(model, cfg.train.precision, reshard_after_forward=bool(plugin.reshard_after_forward))
    return model


# --------------------------------------------------------------------------- export
def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every process, fp32 where the run keeps fp32 master weights
    (collective: every process calls it).

    - DeepSpeed (ZeRO 1-3): each parameter from the optimizer's fp32 partitions
      (`safe_get_full_fp32_param`), so a bf16 run exports its master weights, not the bf16 copy,
      and ZeRO-3 needs no `stage3_gather_16bit_weights_on_model_save`. Buffers are not partitioned.
    - FSDP2: accelerate gathers the DTensor shards (the sharded parameters are the fp32 masters).
    - replicated runs: the module's own state dict.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        module = accelerator.unwrap_model(model)
        params = {id(p) for p in module.parameters()}
        state = {}
        for name, tensor in module.state_dict(keep_vars=True).items():  # the same order on every process
            if id(tensor) in params:
                full = safe_get_full_fp32_param(tensor)
                if full is None and hasattr(tensor, "ds_id"):  # frozen under ZeRO-3: gather the 16-bit copy
                    from deepspeed.zero import GatheredParameters

                    with GatheredParameters([tensor]):
                        full = tensor.detach().clone()
                tensor = tensor.detach() if full is None else full  # frozen under ZeRO 1-2: the copy is whole
            state[name] = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.detach().cpu()
        return state
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.get_state_dict(model)
    return unwrap(accelerator, model).state_dict()


def describe(accelerator: Accelerator) -> dict:
    """What this run actually runs on (recorded in summary.json; tests check it)."""
    info = {
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "backend": getattr(accelerator.state, "backend", None),
    }
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        info["zero_stage"] = accelerator.state.deepspeed_plugin.zero_stage
    if accelerator.distributed_type == DistributedType.FSDP:
        info["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
    return info


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The user's module inside a prepared model (DDP wrapper, DeepSpeed engine, torch.compile).

    accelerate's unwrap_model imports DeepSpeed whenever it is installed (≈8 s); only a DeepSpeed
    run needs that.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def sync_replicas(accelerator: Accelerator, module: nn.Module) -> bool:
    """Broadcast rank 0's parameters and buffers to every replica (after a hook edited weights).

    Only for replicated (DDP) runs; returns False where it does nothing (one process, FSDP,
    DeepSpeed — there the hook itself must act on every rank identically).
    """
    if accelerator.num_processes == 1 or accelerator.distributed_type not in REPLICATED:
        return False
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
    return True


# --------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    kind: str, num_processes: int, script_args: list[str], *, cpu: bool = True, port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of `accelerate launch` for kind ddp | fsdp | deepspeed (ZeRO-2) |
    deepspeed_zero3 | single.

    `single` runs the trainer as one plain process (no launcher). The argv uses this Python's
    accelerate, so it works from a virtual environment without activating it.
    """
    script = [str(REPO / "jetfm" / "train.py"), *script_args]
    if kind == "single":
        return [sys.executable, *script], {}
    port = port or free_port()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
              "--num_machines", "1", "--main_process_port", str(port), "--dynamo_backend", "no",
              "--mixed_precision", "no"]  # jetfm sets precision from train.precision
    env: dict[str, str] = {}
    if kind == "ddp":
        launch += ["--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml")]
        if cpu:
            env["ACCELERATE_USE_CPU"] = "1"
    elif kind == "fsdp":
        launch += ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml")]
        if cpu:
            env["ACCELERATE_USE_CPU"] = "1"
    elif kind in ("deepspeed", "deepspeed_zero3"):
        stage = "zero3" if kind == "deepspeed_zero3" else "zero2"
        launch += ["--config_file", str(REPO / "configs" / "accelerate" / f"deepspeed_{stage}.yaml"),
                   "--deepspeed_config_file", str(REPO / "configs" / "deepspeed" / f"{stage}.json")]
        if cpu:
            env["DS_ACCELERATOR"] = "cpu"
    else:
        raise ValueError(f"launch kind {kind!r}: expected single, ddp, fsdp, deepspeed or deepspeed_zero3")
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    return launch + script, env
