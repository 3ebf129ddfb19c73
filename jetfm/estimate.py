"""How long a run will take on this machine, and a warning when that is more than a day.

The reference configs (configs/*.yaml) are sized for GPUs: 1,000,000 steps of configs/joint.yaml
take months on a laptop CPU. The trainer times its first step and, when
`seconds per step x steps left` exceeds a day, says so and names the laptop-sized preset
(configs/small/<name>.yaml). A measured step is the honest figure: it includes the data
loading, the launcher's processes and whatever else the machine is busy with, which an analytic
FLOP count would not. The first step also fills the loader's shuffle buffer, so the estimate
errs long, never short.
"""

from __future__ import annotations

from pathlib import Path

DAY_S = 24 * 3600.0
SMALL_DIR = Path(__file__).resolve().parents[1] / "configs" / "small"


def format_duration(seconds: float) -> str:
    """`42 s`, `17 min`, `5.3 h`, `131 days`: the unit a reader takes in at a glance."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY_S:.0f} days"


def small_preset(name: str) -> Path | None:
    """The laptop-sized preset of the config named `name` (its `name:` key), if there is one."""
    path = SMALL_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def long_run_warning(name: str, seconds_per_step: float, steps_left: int, limit_s: float = DAY_S) -> str | None:
    """The warning to print when `steps_left` steps at `seconds_per_step` exceed `limit_s`, else None."""
    total = seconds_per_step * max(steps_left, 0)
    if total <= limit_s:
        return None
    text = (f"warning: {steps_left:,} steps at {seconds_per_step:.3g} s per step (the first step here) is about "
            f"{format_duration(total)} on this machine")
    preset = small_preset(name)
    if preset is not None:
        return f"{text}; for a laptop use the small preset: --config {preset.parent.name}/{preset.name}"
    if name.endswith("-small"):
        return f"{text}; lower train.max_steps, or run on a GPU"
    return f"{text}; lower train.max_steps, or start from a laptop-sized preset in configs/small/"
