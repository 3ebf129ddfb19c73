"""Regenerate docs/CONFIG.md from the code: `python docs/make_config.py` (from the repository root).

The key list is what `python jetfm/train.py --keys` prints (every dataclass field of the config,
its type, default and the docstring under it); this script only lays it out as one table per
section. Run it after adding or changing a config field; tests/test_config.py does not check the
page, so a stale page is the only cost of forgetting.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """# Config keys

Every key of a training config (`configs/*.yaml`, `configs/small/*.yaml`), its type, default
and meaning. `python jetfm/train.py --keys` prints the same list from the code, always current;
this page was made from it by `python docs/make_config.py`.

A config is named by its path or by its name under `configs/` (`--config joint.yaml`,
`--config small/joint`). Any key can be overridden on the command line as `section.key=value`
(`train.max_steps=2000`, `optim.betas=[0.9,0.99]`, `finetune.pretrained=null`); `--dry-run`
prints the resolved config; a mistyped key is an error naming the closest valid one.
"""
#: a key line of `--keys`: `name (type, default value)`; the meaning follows, indented
KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.]*) \((?P<spec>.*)\)$")


def parse(text: str) -> list[tuple[str, str, str, str]]:
    """[(key, type, default, meaning)] from the `--keys` listing."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        match = KEY.match(line)
        if match:
            kind, _, default = match["spec"].rpartition(", default ")
            rows.append([match["key"], kind, default, ""])
        elif line.startswith("    ") and rows:
            rows[-1][3] = (rows[-1][3] + " " + line.strip()).strip()
        elif line.strip():
            raise ValueError(f"unexpected line in `jetfm/train.py --keys` output: {line!r}")
    return [tuple(row) for row in rows]


def render(rows) -> str:
    sections: dict[str, list[str]] = {}
    for key, kind, default, meaning in rows:
        section = key.split(".")[0] if "." in key else "top level"
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731 - a table cell
        sections.setdefault(section, []).append(f"| `{key}` | {cell(kind)} | `{cell(default)}` | {cell(meaning)} |")
    parts = [HEADER]
    for section, lines in sections.items():
        parts += ["", f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|", *lines]
    return "\n".join(parts) + "\n"


def main() -> int:
    text = subprocess.run([sys.executable, str(ROOT / "jetfm" / "train.py"), "--keys"], check=True, cwd=ROOT,
                          capture_output=True, text=True).stdout
    (ROOT / "docs" / "CONFIG.md").write_text(render(parse(text)))
    print(f"wrote {ROOT / 'docs' / 'CONFIG.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
