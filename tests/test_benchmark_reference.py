"""benchmarks/reference_figures.py: speedup_vs_reference divides by the reference's figures timed
on the same CPU type, or says loudly that it does not."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_figures  # noqa: E402

ZEN4 = {"name": "zen4", "measured": "2026-12-01", "cpu_isa": None,
        "matmul_peak_gflop_per_s": {"fp32": [176, 193], "bf16": [366, 403]}, "train": {}}
ZEN5 = {"name": "zen5", "measured": "2026-12-02", "cpu_isa": ["avx512_bf16", "avx512_vp2intersect", "avx512f"],
        "matmul_peak_gflop_per_s": {"fp32": 190, "bf16": 820}, "train": {}}


def test_the_entry_timed_on_this_cpu_type_wins_whatever_the_load():
    entry, why = reference_figures.pick([ZEN4, ZEN5], {"fp32": 90.0, "bf16": 380.0}, isa=ZEN5["cpu_isa"])
    assert entry is ZEN5 and "this CPU type" in why and "WARNING" not in why


def test_another_cpu_gets_the_nearest_matmul_peak_and_a_warning():
    entry, why = reference_figures.pick([ZEN4, ZEN5], {"fp32": 180.0, "bf16": 390.0}, isa=["avx512f"])
    assert entry is ZEN4 and why.startswith("WARNING") and "zen4" in why
    entry, why = reference_figures.pick([ZEN4, ZEN5], {"fp32": 200.0, "bf16": 800.0}, isa=["avx512f"])
    assert entry is ZEN5 and "bf16 x0.98" in why
    entry, why = reference_figures.pick([ZEN4, ZEN5], None, isa=[])  # nothing to match: the latest
    assert entry is ZEN5 and why.startswith("WARNING")
    assert reference_figures.pick([], None) == (None, "no reference figures stored")


def test_machine_ratio_reads_ranges_and_single_figures():
    assert reference_figures.machine_ratio(ZEN4, {"fp32": 184.5, "bf16": 769.0}) == pytest.approx({"fp32": 1.0, "bf16": 2.0})
    assert reference_figures.machine_ratio(ZEN5, {"bf16": 410.0}) == pytest.approx({"bf16": 0.5})


def test_the_stored_figures_carry_what_the_benchmarks_divide_by():
    machines = reference_figures.load()
    assert machines, "benchmarks/results/reference.json has no machines"
    for m in machines:
        assert {"name", "measured", "machine", "cpu_isa", "matmul_peak_gflop_per_s", "train", "generate"} <= set(m)
        assert m["train"]["joint/bf16/batch64"]["particles_per_s"] > 0
        assert m["generate"]["continuous/batch64/length100"]["jets_per_s"] > 0
    assert len({m["name"] for m in machines}) == len(machines)
