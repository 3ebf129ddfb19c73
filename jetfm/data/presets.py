"""Generator presets: which Pythia 8 processes make which jet classes, in which window.

    jetfm data generate data/toptag --preset toptag --set pt_min=500 --set mpi=on

A preset is a `GeneratorSettings`; every field except `name` can be overridden by
`--set key=value` (CLI) or `overrides={...}` (`generate_dataset`). A class is made by one
`Process`: Pythia `readString` lines plus the truth signature a jet must carry to get the
class label (docs/METHOD.md §1 recipes):

- `resonance=None` (QCD): every anti-kT jet in the window is kept.
- otherwise: the jet is kept only if some resonance with that |PDG id| decays into the
  `decay` pattern and every visible decay product lies within `match_radius` of the jet axis.

Decay patterns name the final decay products (through intermediate t/W/Z/H decays):
`Q` any quark d..b, `b`, `c`, `g` gluon, `l` electron or muon, `v` neutrino (not required
inside the jet). The decay products are taken at the resonance decay, before showering.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .format import JETCLASS_CLASSES, TOPTAG_CLASSES, DataError

#: |PDG id| of the resonances whose decay chains are followed when truth-matching.
RESONANCES = (6, 23, 24, 25)


@dataclass(frozen=True)
class Process:
    """How one jet class is generated and recognised."""

    description: str
    pythia: tuple[str, ...]
    """Pythia `readString` lines that select the hard process and force the decays."""
    resonance: int | None = None
    """|PDG id| the jet must be matched to; None keeps every jet in the window (QCD)."""
    decay: str = ""
    """Decay pattern of the resonance (see module docstring), e.g. "QQQ" for t -> bqq'."""

    def __post_init__(self):
        unknown = set(self.decay) - set("Qbcglv")
        if unknown:
            raise ValueError(f"decay pattern {self.decay!r} has unknown symbols {sorted(unknown)}")


_TTBAR = ("Top:gg2ttbar = on", "Top:qqbar2ttbar = on")
_W_JET = ("WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on")
_Z_JET = ("WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on", "WeakZ0:gmZmode = 2")
_H_JET = ("HiggsSM:gg2Hg(l:t) = on", "HiggsSM:qg2Hq(l:t) = on", "HiggsSM:qqbar2Hg(l:t) = on")
_W_HADRONIC = ("24:onMode = off", "24:onIfAny = 1 2 3 4 5")
_H_WW = ("25:onMode = off", "25:onIfMatch = 24 -24")

#: Every process a class can be made from (`--set process.<Class>=<name>` picks another).
PROCESSES: dict[str, Process] = {
    "dijet": Process("QCD 2->2 dijets", ("HardQCD:all = on",)),
    "znunu_jet": Process(
        "Z(->nunu) + jet, the recoiling q/g jet (JetClass QCD sample)",
        _Z_JET + ("23:onMode = off", "23:onIfAny = 12 14 16"),
    ),
    "ttbar_hadronic": Process("ttbar, both W -> qq'; jet = t -> bqq'", _TTBAR + _W_HADRONIC, 6, "QQQ"),
    "ttbar_leptonic": Process(
        "ttbar, both W -> e/mu nu; jet = t -> b l nu (b and l inside)",
        _TTBAR + ("24:onMode = off", "24:onIfAny = 11 13"), 6, "Qlv",
    ),
    "w_jet": Process("W + jet, W -> qq'", _W_JET + _W_HADRONIC, 24, "QQ"),
    "z_jet": Process("Z + jet, Z -> qq", _Z_JET + ("23:onMode = off", "23:onIfAny = 1 2 3 4 5"), 23, "QQ"),
    "h_bb": Process("H + jet, H -> bb", _H_JET + ("25:onMode = off", "25:onIfAny = 5"), 25, "bb"),
    "h_cc": Process("H + jet, H -> cc", _H_JET + ("25:onMode = off", "25:onIfAny = 4"), 25, "cc"),
    "h_gg": Process("H + jet, H -> gg", _H_JET + ("25:onMode = off", "25:onIfAny = 21"), 25, "gg"),
    "h_4q": Process("H + jet, H -> WW* -> 4q", _H_JET + _H_WW + _W_HADRONIC, 25, "QQQQ"),
    "h_qqlv": Process(
        "H + jet, H -> WW* -> qq' l nu (W -> qq' or e/mu nu; events with exactly one lepton match)",
        _H_JET + _H_WW + ("24:onMode = off", "24:onIfAny = 1 2 3 4 5 11 13"), 25, "QQlv",
    ),
}


def _leaf_kind(abs_id: int) -> str:
    if abs_id == 5:
        return "b"
    if abs_id == 4:
        return "c"
    if 1 <= abs_id <= 3:
        return "q"
    if abs_id == 21:
        return "g"
    if abs_id in (11, 13):
        return "l"
    if abs_id in (12, 14, 16):
        return "v"
    return "x"


def decay_matches(leaf_ids, pattern: str) -> bool:
    """Whether decay products with these PDG ids fit `pattern` (see module docstring)."""
    have = Counter(_leaf_kind(abs(int(i))) for i in leaf_ids)
    want = Counter(pattern)
    if have["x"] or any(have[k] != want[k] for k in "glv"):
        return False
    quarks = have["b"] + have["c"] + have["q"]
    return quarks == want["Q"] + want["b"] + want["c"] and have["b"] >= want["b"] and have["c"] >= want["c"]


@dataclass
class GeneratorSettings:
    """Everything that defines a generated dataset besides the seed and the jet counts."""

    name: str
    """Preset name (informational)."""
    classes: list[str]
    """Class names in label order (label = index)."""
    processes: dict[str, str]
    """Class name -> key of PROCESSES that makes it."""
    sqrt_s: float
    """Proton-proton centre-of-mass energy (GeV)."""
    pt_min: float
    """Jet window: pt_min < jet pT (GeV)."""
    pt_max: float
    """Jet window: jet pT < pt_max (GeV)."""
    eta_max: float
    """Jet window: |jet eta| < eta_max."""
    mpi: bool
    """Multi-parton interactions (underlying event) on or off."""
    pthat_min: float | None = None
    """Pythia PhaseSpace:pTHatMin (GeV); None = pthat_fraction * pt_min."""
    pthat_fraction: float = 0.8
    """Default pTHatMin as a fraction of pt_min. A window jet can come from an event with a
    lower hard scale (hard ISR/FSR): at 0.8, ~15% of the toptag window jets (QCD and top) are
    not generated; 0.6 misses ~2-5% but is ~5x slower. The missing jets have the same mass
    and multiplicity distributions (measured), so this changes rates, not jet shapes."""
    jet_radius: float = 0.8
    """Anti-kT distance parameter R."""
    match_radius: float = 0.8
    """Truth matching: every visible decay product within this Delta R of the jet axis."""
    max_particles: int = 128
    """Constituents kept per jet (the highest-pT ones); jet features use all of them."""
    pythia: list[str] = field(default_factory=list)
    """Extra Pythia readString lines for every class, applied after the preset's."""

    def __post_init__(self):
        self.classes = list(self.classes)
        self.processes = dict(self.processes)
        self.pythia = [self.pythia] if isinstance(self.pythia, str) else list(self.pythia)
        if not self.classes:
            raise DataError("generator settings: no classes")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"generator settings: repeated class names in {self.classes}")
        for name in self.classes:
            if name not in self.processes:
                raise DataError(
                    f"generator settings: class {name!r} has no process; set process.{name}=<one of {sorted(PROCESSES)}>"
                )
            if self.processes[name] not in PROCESSES:
                raise DataError(
                    f"generator settings: process {self.processes[name]!r} for class {name!r} is unknown; "
                    f"known: {sorted(PROCESSES)}"
                )
        if not 0 < self.pt_min < self.pt_max:
            raise DataError(f"generator settings: need 0 < pt_min < pt_max, got {self.pt_min}, {self.pt_max}")
        if self.eta_max <= 0 or self.jet_radius <= 0 or self.match_radius <= 0 or self.sqrt_s <= 0:
            raise DataError("generator settings: eta_max, jet_radius, match_radius and sqrt_s must be positive")
        if self.max_particles < 1:
            raise DataError(f"generator settings: max_particles must be >= 1, got {self.max_particles}")
        if self.pthat_min is not None and not 0 <= self.pthat_min < self.sqrt_s / 2:
            raise DataError(f"generator settings: pthat_min {self.pthat_min} outside [0, sqrt_s/2)")
        for line in self.pythia:
            if line.replace(" ", "").lower().startswith(("random:seed", "random:setseed")):
                raise DataError(f"pythia line {line!r}: seeds come from the `seed` argument (--seed), per work unit")

    @property
    def pthat(self) -> float:
        return self.pthat_min if self.pthat_min is not None else self.pthat_fraction * self.pt_min

    def process(self, name: str) -> Process:
        return PROCESSES[self.processes[name]]

    def pythia_lines(self, name: str) -> list[str]:
        """All readString lines for class `name`, except the random seed."""
        return [
            "Print:quiet = on",
            f"Beams:eCM = {self.sqrt_s:g}",
            f"PartonLevel:MPI = {'on' if self.mpi else 'off'}",
            f"PhaseSpace:pTHatMin = {self.pthat:g}",
            *self.process(name).pythia,
            *self.pythia,
        ]

    def to_json(self) -> dict:
        out = asdict(self)
        out["processes"] = {name: self.processes[name] for name in self.classes}
        out["pythia_lines"] = {name: self.pythia_lines(name) for name in self.classes}
        return out


PRESETS: dict[str, GeneratorSettings] = {
    "toptag": GeneratorSettings(
        name="toptag",
        classes=list(TOPTAG_CLASSES),
        processes={"QCD": "dijet", "Tbqq": "ttbar_hadronic"},
        sqrt_s=14000.0, pt_min=550.0, pt_max=650.0, eta_max=2.0, mpi=False,
    ),
    "jetclass": GeneratorSettings(
        name="jetclass",
        classes=list(JETCLASS_CLASSES),
        processes={
            "QCD": "znunu_jet", "Hbb": "h_bb", "Hcc": "h_cc", "Hgg": "h_gg", "H4q": "h_4q",
            "Hqql": "h_qqlv", "Zqq": "z_jet", "Wqq": "w_jet", "Tbqq": "ttbar_hadronic", "Tbl": "ttbar_leptonic",
        },
        sqrt_s=13000.0, pt_min=500.0, pt_max=1000.0, eta_max=2.0, mpi=True,
    ),
}

#: Settings `--set key=value` / `overrides` may change, with a one-line description.
OVERRIDE_HELP = {
    "sqrt_s": "pp centre-of-mass energy in GeV",
    "pt_min": "jet window lower pT edge, GeV",
    "pt_max": "jet window upper pT edge, GeV",
    "eta_max": "jet window |eta| bound",
    "mpi": "multi-parton interactions on/off",
    "pthat_min": "Pythia PhaseSpace:pTHatMin in GeV (default pthat_fraction * pt_min)",
    "pthat_fraction": "default pTHatMin / pt_min (0.8)",
    "jet_radius": "anti-kT R (0.8)",
    "match_radius": "truth-matching Delta R (0.8)",
    "max_particles": "constituents kept per jet, hardest first (128)",
    "pythia": "extra Pythia readString lines, ';'-separated, for every class",
    "classes": "comma-separated class names, label order as given (a new name needs process.<Class>)",
    "process.<Class>": f"process making <Class>: one of {', '.join(PROCESSES)}",
}
OVERRIDE_KEYS = tuple(OVERRIDE_HELP)


def get_preset(name: str) -> GeneratorSettings:
    if name not in PRESETS:
        raise DataError(f"unknown generator preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "on", "true", "yes"):
        return True
    if text in ("0", "off", "false", "no"):
        return False
    raise DataError(f"override {key}={value!r}: expected on/off/true/false")


def _parse_number(key: str, value: Any, kind: type):
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "") and key == "pthat_min":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise DataError(f"override {key}={value!r}: expected a {kind.__name__}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise DataError(f"override {key}={value!r}: expected an integer")
    return number


def _parse_list(value: Any, separator: str) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(separator) if item.strip()]
    return [str(item).strip() for item in value]


def apply_overrides(settings: GeneratorSettings, overrides: dict[str, Any] | None) -> GeneratorSettings:
    """A copy of `settings` with `overrides` applied; values may be typed or strings (CLI).

    `pythia` takes a list or a ';'-separated string of lines (appended to the preset's extra
    lines); `classes` a list or comma-separated names; `process.<Class>` a PROCESSES key.
    """
    if not overrides:
        return replace(settings)
    kinds = {f.name: f.type for f in fields(GeneratorSettings)}
    changes: dict[str, Any] = {}
    processes = dict(settings.processes)
    for key, value in overrides.items():
        if key.startswith("process."):
            processes[key[len("process."):]] = str(value).strip()
        elif key not in OVERRIDE_KEYS:
            raise DataError(f"unknown generator setting {key!r}; valid keys: {list(OVERRIDE_KEYS)}")
        elif key == "mpi":
            changes[key] = _parse_bool(key, value)
        elif key == "pythia":
            changes[key] = settings.pythia + _parse_list(value, ";")
        elif key == "classes":
            changes[key] = _parse_list(value, ",")
        else:
            kind = int if kinds[key] == "int" else float
            changes[key] = _parse_number(key, value, kind)
    return replace(settings, processes=processes, **changes)


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """CLI `--set key=value` strings -> dict (the value may itself contain '=')."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--set {item!r}: expected key=value; valid keys: {list(OVERRIDE_KEYS)}")
        key = key.strip()
        if key == "pythia" and key in out:  # repeated --set pythia=... lines accumulate
            out[key] = out[key] + ";" + value
        else:
            out[key] = value
    return out
