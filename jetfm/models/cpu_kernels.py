"""jetfm's C kernels for CPU: build, load, and their autograd functions.

- `varlen_attention_cpu` (`kernels/varlen_attention.c`): attention within packed jets.
- `dropout_add` (`kernels/dropout_add.c`): a residual add with dropout on the branch.
- `softmax_cross_entropy_` (`kernels/softmax_xent.c`): a chunk of logit rows -> summed
  cross-entropy, top-1 hits and, in place, softmax - onehot (the fused vocabulary loss's middle).

Attention — why: on CPU, torch's SDPA needs a padded layout (jets scattered into length buckets and gathered
back around every layer) and its kernel makes one tiny GEMM call per (jet, head, block); with
jets of ~50 particles and 16-dim heads the calls cost more than the arithmetic. The kernel
(`kernels/varlen_attention.c`) works on the packed (T, 3, H, D) projection directly, one
(jet, head) per task, and recomputes the probabilities in the backward from a saved log-sum-exp
(measured at the reference size, batch 64: forward + backward 3-4x faster than the bucketed
SDPA path, fp32 and bf16; `benchmarks/train_throughput.py`).

Dropout — why: `x + dropout(y)` with torch ops is a random draw, a kept mask, a select and an
add; the kernel hashes (seed, element index) into the keep bit, in one pass each way and with
no mask stored (the backward recomputes it from the seed). The seed is drawn from torch's RNG,
so `torch.manual_seed` and checkpointed RNG states reproduce it. Same distribution as
`F.dropout` (drop probability rounded to a multiple of 1/65536, kept values scaled by the
exact inverse keep probability); different random numbers.

The sources are compiled on first use with the machine's C compiler (`$CC`, else `cc`; flags
`-O3 -march=native -fopenmp`) into a cache directory (`$JETFM_KERNEL_CACHE`, else
`~/.cache/jetfm/kernels`, else the temp directory where that is read-only), keyed by the
sources, the compiler, the flags and the CPU model, so a home directory shared across a
cluster's different nodes never loads a library built for another CPU. Without a compiler (or
on failure) `available()` is False, one warning says why, and attention, dropout and the loss
run on torch ops: same mathematics, slower. `model.attention: sdpa` skips the kernels.

OpenMP: the library links `libgomp.so.1`, which resolves to the copy torch has already loaded,
so the kernels' threads are torch's threads (`torch.get_num_threads()` per call). Results do
not depend on the thread count: each (jet, head) or element is computed by one thread alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from jetfm import messages

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = tuple(KERNELS / name for name in ("varlen_attention.c", "dropout_add.c", "softmax_xent.c"))
HEADERS = (KERNELS / "elements.h",)  # included by SOURCES: part of the cache key
DECODE_SOURCE = KERNELS / "kv_decode.cpp"  # a torch C++ extension (decode_extension)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
LIBS = ("-lmvec", "-lm")  # glibc's vector expf; retried without -lmvec where it does not exist
COMPILE_TIMEOUT_S = 120
DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # kernels/varlen_attention.c


def cache_dir() -> Path:
    if os.environ.get("JETFM_KERNEL_CACHE"):
        return Path(os.environ["JETFM_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "jetfm" / "kernels"


def _cpuinfo_lines(keys: tuple[str, ...]) -> list[str] | None:
    """The distinct /proc/cpuinfo lines for `keys`, sorted; None where the file is unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return sorted({ln for ln in lines if ln.split(":")[0].strip() in keys})


def _cpu_identity() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    keep = _cpuinfo_lines(("model name", "flags", "Features", "CPU part"))
    if keep is None:
        return platform.processor() or platform.machine()
    return "\n".join(keep) or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"), sorted; [] where unknown."""
    return sorted({flag for ln in _cpuinfo_lines(("flags", "Features")) or [] for flag in ln.split(":", 1)[1].split()})


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cache_key(*parts: bytes | str) -> str:
    """A short hash of what a compiled library depends on, the CPU it is compiled for included."""
    blobs = [p if isinstance(p, bytes) else p.encode() for p in parts]
    return hashlib.sha256(b"\0".join([*blobs, _cpu_identity().encode(), platform.machine().encode()])).hexdigest()[:16]


def _writable_dir(entry: str) -> Path:
    """`entry` inside the cache directory, or inside the temp directory where that is not writable
    (a read-only home on some clusters): the first that exists or can be made, writable."""
    fallback = Path(tempfile.gettempdir()) / f"jetfm-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    for base in (cache_dir(), fallback):
        if (base / entry).exists():
            return base
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK):
            return base
    raise RuntimeError(f"no writable directory for compiled kernels ({cache_dir()}, {fallback}); set JETFM_KERNEL_CACHE")


def _build(cc: str) -> Path:
    """Compile the C kernels (or find them in the cache); returns the shared library's path."""
    key = _cache_key(*(src.read_bytes() for src in SOURCES + HEADERS), _compiler_version(cc), " ".join(FLAGS + LIBS))
    name = f"jetfm_cpu_kernels-{key}.so"
    directory = _writable_dir(name)
    target = directory / name
    if target.exists():
        return target
    # compile next to the target, then rename: processes building at once never load half a file
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = Path(tmp) / target.name
        errors = []
        for libs in (LIBS, ("-lm",)):
            cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", str(out), *libs]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(out, target)
                return target
            errors.append(f"{' '.join(cmd)}\n{run.stderr.strip()[-2000:]}")
        raise RuntimeError("\n".join(errors))


@functools.cache
def _library():
    """The loaded kernel library, or None (after one warning) when it cannot be built."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        messages.warn(f"no C compiler ({cc!r}) found: attention and dropout on CPU run on torch ops (slower); "
                      f"install gcc or set CC to use jetfm's CPU kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        messages.warn(f"jetfm's CPU kernels could not be built ({', '.join(s.name for s in SOURCES)}); attention "
                      f"and dropout run on torch ops (slower). The compiler said:\n{err}")
        return None
    ptr, i32, i64, u32, u64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_float
    lib.jetfm_attn_fwd.argtypes = [ptr, i32, ptr, i32, i32, i32, i32, f32, ptr, ptr, i32]
    lib.jetfm_attn_bwd.argtypes = [ptr, ptr, ptr, ptr, i32, ptr, i32, i32, i32, i32, f32, ptr, i32]
    lib.jetfm_attn_fwd.restype = lib.jetfm_attn_bwd.restype = i32
    lib.jetfm_dropout_add_fwd.argtypes = [ptr, i32, ptr, i32, ptr, i64, u64, u32, f32, i32]
    lib.jetfm_dropout_bwd.argtypes = [ptr, i32, ptr, i32, i64, u64, u32, f32, i32]
    lib.jetfm_dropout_add_fwd.restype = lib.jetfm_dropout_bwd.restype = None
    lib.jetfm_softmax_xent.argtypes = [ptr, i32, ptr, i64, i64, i32, ptr, ptr, i32]
    lib.jetfm_softmax_xent.restype = i32
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


def supports(qkv_T3HD: torch.Tensor) -> bool:
    """Whether the kernel can take this (T, 3, H, D) tensor: CPU, fp32/bf16, head dim <= 256, and
    the library exists."""
    return (qkv_T3HD.device.type == "cpu" and qkv_T3HD.dtype in DTYPES and qkv_T3HD.shape[-1] <= MAX_HEAD_DIM
            and available())


def _check(status: int, what: str) -> None:
    if status == -1:
        raise MemoryError(f"CPU attention kernel ({what}): out of memory for its per-thread buffers")
    if status == -2:
        raise ValueError(f"CPU attention kernel ({what}): cu_seqlens must start at 0, never decrease and end at "
                         f"the number of packed tokens")
    if status == -3:
        raise ValueError(f"CPU attention kernel ({what}): head dim must lie in [1, {MAX_HEAD_DIM}]")
    if status != 0:
        raise RuntimeError(f"CPU attention kernel ({what}) failed with status {status}")


class _VarlenAttention(torch.autograd.Function):
    """softmax(q k^T * scale [causal]) v within each packed sequence; q/k/v stacked as (T, 3, H, D)."""

    @staticmethod
    def forward(ctx, qkv_T3HD, cu_seqlens_B1, causal: bool, scale: float):
        lib = _library()
        qkv_T3HD = qkv_T3HD.contiguous()
        T, _, H, D = qkv_T3HD.shape
        out_THD = qkv_T3HD.new_empty((T, H, D))
        lse_TH = torch.empty((T, H), dtype=torch.float32)
        is_bf16 = int(qkv_T3HD.dtype == torch.bfloat16)
        _check(lib.jetfm_attn_fwd(qkv_T3HD.data_ptr(), is_bf16, cu_seqlens_B1.data_ptr(), cu_seqlens_B1.numel() - 1,
                                  H, D, int(causal), scale, out_THD.data_ptr(), lse_TH.data_ptr(),
                                  torch.get_num_threads()), "forward")
        ctx.save_for_backward(qkv_T3HD, cu_seqlens_B1, out_THD, lse_TH)
        ctx.causal, ctx.scale = causal, scale
        return out_THD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_THD):
        qkv_T3HD, cu_seqlens_B1, out_THD, lse_TH = ctx.saved_tensors
        grad_THD = grad_THD.to(out_THD.dtype).contiguous()
        _, _, H, D = qkv_T3HD.shape
        grad_T3HD = torch.empty_like(qkv_T3HD)
        is_bf16 = int(qkv_T3HD.dtype == torch.bfloat16)
        _check(_library().jetfm_attn_bwd(
            qkv_T3HD.data_ptr(), out_THD.data_ptr(), grad_THD.data_ptr(), lse_TH.data_ptr(), is_bf16,
            cu_seqlens_B1.data_ptr(), cu_seqlens_B1.numel() - 1, H, D, int(ctx.causal), ctx.scale,
            grad_T3HD.data_ptr(), torch.get_num_threads()), "backward")
        return grad_T3HD, None, None, None


def varlen_attention_cpu(qkv_T3HD: torch.Tensor, cu_seqlens: torch.Tensor, *, causal: bool,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """(T, 3, H, D) packed q/k/v -> (T, H, D) attention within each sequence, in the input's dtype
    (fp32 or bf16; arithmetic in fp32). Call only where `supports(qkv_T3HD)` holds."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if qkv_T3HD.dim() != 4 or qkv_T3HD.shape[1] != 3:
        raise ValueError(f"expected q/k/v stacked as (T, 3, H, D), got {tuple(qkv_T3HD.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv_T3HD.shape[-1])
    cu = cu_seqlens.to(device="cpu", dtype=torch.int32).contiguous()
    if int(cu[-1]) != qkv_T3HD.shape[0]:  # CPU tensor: a free host read; the kernel checks the rest
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, but {qkv_T3HD.shape[0]} tokens are packed")
    return _VarlenAttention.apply(qkv_T3HD, cu, causal, float(scale))


# --------------------------------------------------------------------------- dropout
class _DropoutAdd(torch.autograd.Function):
    """x + dropout(y): the keep bit of element i hashed from (seed, i) in the kernel."""

    @staticmethod
    def forward(ctx, x, y, dropped: int, seed: int):
        out = torch.empty_like(x)
        scale = 65536.0 / (65536 - dropped)
        _library().jetfm_dropout_add_fwd(x.data_ptr(), int(x.dtype == torch.bfloat16), y.data_ptr(),
                                         int(y.dtype == torch.bfloat16), out.data_ptr(), x.numel(), seed, dropped,
                                         scale, torch.get_num_threads())
        ctx.seed, ctx.dropped, ctx.scale, ctx.dtypes = seed, dropped, scale, (x.dtype, y.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_dtype, y_dtype = ctx.dtypes
        grad = grad.contiguous()
        grad_y = torch.empty(grad.shape, dtype=y_dtype)
        _library().jetfm_dropout_bwd(grad.data_ptr(), int(grad.dtype == torch.bfloat16), grad_y.data_ptr(),
                                     int(y_dtype == torch.bfloat16), grad.numel(), ctx.seed, ctx.dropped, ctx.scale,
                                     torch.get_num_threads())
        return grad.to(x_dtype), grad_y, None, None


def dropout_add_supported(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `dropout_add` can take these tensors: CPU, same shape, contiguous, fp32/bf16, < 2^32
    elements (the hashed index is 32 bits), and the library exists."""
    return (x.device.type == "cpu" and y.device.type == "cpu" and x.shape == y.shape and x.dtype in DTYPES
            and y.dtype in DTYPES and x.is_contiguous() and y.is_contiguous() and x.numel() < 2**32 and available())


def dropout_add(x: torch.Tensor, y: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + dropout(y, p) in x's dtype (training mode), drawing its seed from `generator` (None:
    torch's global RNG). Call only where `dropout_add_supported(x, y)` holds and 0 < p < 1."""
    dropped = round(p * 65536)
    seed = int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, generator=generator)) & (2**64 - 1)
    return _DropoutAdd.apply(x, y, dropped, seed)


# --------------------------------------------------------------------------- cross-entropy
def softmax_cross_entropy_supported(z_RV: torch.Tensor) -> bool:
    return z_RV.device.type == "cpu" and z_RV.dtype in DTYPES and z_RV.dim() == 2 and z_RV.is_contiguous() and available()


def softmax_cross_entropy_(z_RV: torch.Tensor, targets_R: torch.Tensor, *, need_grad: bool) -> tuple[float, int]:
    """(summed cross-entropy, top-1 hits; ties count as hits) of logit rows `z_RV` against
    `targets_R`; with `need_grad`, `z_RV` is overwritten by softmax - onehot (the gradient of the
    sum with respect to the logits). fp32 arithmetic; the loss summed in double."""
    targets = targets_R.to(torch.int64).contiguous()
    loss, correct = ctypes.c_double(), ctypes.c_int64()
    status = _library().jetfm_softmax_xent(z_RV.data_ptr(), int(z_RV.dtype == torch.bfloat16), targets.data_ptr(),
                                           z_RV.shape[0], z_RV.shape[1], int(need_grad), ctypes.byref(loss),
                                           ctypes.byref(correct), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"cross-entropy kernel: targets must lie in [0, {z_RV.shape[1]}) (or out of memory)")
    return loss.value, correct.value


# --------------------------------------------------------------------------- generation (C++)
@functools.cache
def decode_extension():
    """The generation step's torch C++ extension (`kernels/kv_decode.cpp`: one-query attention on the
    position-major KV cache, whole-stack block steps, the small-batch linear layers), or None after
    one warning.

    Why C++ with torch headers, unlike the C kernels above: the kernels take and return tensors
    and run on torch's threads (at::parallel_for), called from Python with the GIL released, so
    that generation shards run side by side. Built with torch's cpp_extension (needs a C++
    compiler and ninja; ~40 s once) into the same cache directory, keyed the same way (source,
    torch version, flags, CPU model).
    """
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    try:
        from torch.utils.cpp_extension import load_inline  # noqa: PLC0415

        source = DECODE_SOURCE.read_text()
        key = _cache_key(source, torch.__version__, " ".join(flags))
        entry = f"kv_decode-{key}"
        build_dir = _writable_dir(entry) / entry
        build_dir.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for splits rows over torch's threads only when compiled with OpenMP
        return load_inline(name=f"jetfm_kv_decode_{key}", cpp_sources=source,  # its own PYBIND11_MODULE
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception as error:  # no compiler, headers or ninja: the torch path is correct, only slower
        messages.warn(f"generation's compiled KV-cache kernels are unavailable ({type(error).__name__}: "
                      f"{str(error)[:300]}); generation runs on torch ops (slower)")
        return None
