"""The reference implementation's stored figures (`results/reference.json`) for the CPU a
benchmark runs on.

Why per machine: `speedup_vs_reference` divides jetfm's throughput, measured now, by the
reference's, measured once (its code is no part of jetfm and is not run by these scripts). A
ratio against a figure taken on another CPU measures the CPU as much as the code: the two
development machines of 2026-12 differ by 2.2x in bf16 matmul peak and by ~3x in generation
(memory bandwidth). So reference.json holds one entry per machine the reference was timed on,
each with the CPU's instruction-set flags and its matmul peak, and the scripts divide by the
entry whose flags match this CPU. Where none matches they take the entry with the nearest
matmul peak and say so, with the peak ratio, in the printout and the JSON line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jetfm.models import cpu_kernels  # the scripts put the repository first on sys.path

REFERENCE = Path(__file__).resolve().parent / "results" / "reference.json"
# the flags that decide the speed of these kernels (vector width, bf16 dot products, AMX tiles)
ISA_PREFIXES = ("avx512", "amx", "avx_vnni", "avx2", "fma")


def cpu_isa() -> list[str]:
    """This CPU's vector instruction-set flags (sorted), or [] where they cannot be read."""
    return [flag for flag in cpu_kernels.cpu_flags() if flag.startswith(ISA_PREFIXES)]


def load(path: Path = REFERENCE) -> list[dict]:
    """The stored machines ([] without the file): each with name, measured, machine, cpu_isa,
    matmul_peak_gflop_per_s, train and generate figures."""
    return json.loads(path.read_text())["machines"] if path.exists() else []


def _peak_mid(entry: dict, dtype: str) -> float | None:
    value = entry.get("matmul_peak_gflop_per_s", {}).get(dtype)
    if value is None:
        return None
    return sum(value) / len(value) if isinstance(value, list) else float(value)


def machine_ratio(entry: dict, peak: dict) -> dict:
    """This run's matmul peak / the one stored with `entry`, per dtype: below 1 the machine is
    slower now than when the reference was timed (a shared VM's neighbours, or another CPU), and
    speedup_vs_reference is understated by about that factor; above 1, overstated."""
    return {dt: peak[dt] / _peak_mid(entry, dt) for dt in ("fp32", "bf16") if dt in peak and _peak_mid(entry, dt)}


def pick(machines: list[dict], peak: dict | None = None, isa: list[str] | None = None) -> tuple[dict | None, str]:
    """The entry to divide by, and one line that says why.

    Same instruction-set flags as this CPU: the latest such entry. Otherwise, with a matmul peak
    measured in this run: the entry whose stored peaks are nearest (geometric mean of the per-dtype
    ratios closest to 1). Otherwise the latest entry. The last two are flagged: the ratio then
    compares two CPUs as well as two codes."""
    if not machines:
        return None, "no reference figures stored"
    isa = cpu_isa() if isa is None else isa
    same = [m for m in machines if m.get("cpu_isa") == isa]
    if isa and same:
        entry = max(same, key=lambda m: m["measured"])
        return entry, f"reference timed on this CPU type ({entry['name']}, {entry['measured']})"
    candidates = [m for m in machines if peak and machine_ratio(m, peak)]
    if candidates:
        def distance(m):
            ratios = machine_ratio(m, peak).values()
            return abs(sum(math.log(r) for r in ratios) / len(ratios))

        entry = min(candidates, key=distance)
        ratios = ", ".join(f"{dt} x{r:.2f}" for dt, r in machine_ratio(entry, peak).items())
        return entry, (f"WARNING: no reference figures timed on this CPU type; dividing by those of {entry['name']} "
                       f"({entry['measured']}), the nearest matmul peak (this run / then: {ratios}): the ratio "
                       f"compares the CPUs as well as the code")
    entry = max(machines, key=lambda m: m["measured"])
    return entry, (f"WARNING: no reference figures timed on this CPU type; dividing by the latest, {entry['name']} "
                   f"({entry['measured']}): the ratio compares the CPUs as well as the code")
