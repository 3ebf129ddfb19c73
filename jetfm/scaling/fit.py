"""Scaling-law fits: the parametric L(N, D), bootstrap intervals, IsoFLOP profiles, repetition.

    law = fit_law(N, D, loss)                                    # Chinchilla's approach 3
    law.E, law.A, law.alpha, law.B, law.beta, law.a, law.b       # a = beta/(alpha+beta), b = alpha/(alpha+beta)
    boot = bootstrap_law(N, D, loss, resamples=200)              # {param: (low, high)} over resampled runs
    iso = isoflop_analysis(N, D, loss, flops)                    # N_opt(C) per budget and the exponents
    law = fit_law(N, D, loss, unique=U)                          # + Muennighoff's R* when data repeat

The law (Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta, fitted as
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimising the
Huber loss (delta = 1e-3) of the log-loss residuals with L-BFGS. The objective has many local
minima, so it is started from a grid of initial values (alpha, beta in {0, 0.5, .., 2}, e in
{-1, -0.5, .., 1}, a, b in {0, 5, .., 25}); the grid's objective is evaluated everywhere at once
and L-BFGS runs from its `starts` best points (Hoffmann et al. ran it from every grid point;
the best few reach the same optimum at a fraction of the cost); the best result by objective wins.

Repetition (Muennighoff et al. 2023): a run that saw D particles of U unique ones has repeated
R = D / U - 1 times; its effective data is D' = U + U R* (1 - exp(-R / R*)), which equals D for
R << R* and saturates at U (1 + R*). With `unique` given and some R > 0, log R* is fitted with
the other five parameters (from a few initial values); without repetition D' = D.

Compute-optimal allocation under C = k N D (k = 6 by the usual convention): minimising L at
fixed C gives N*(C) = G (C / k)^a, D*(C) = (C / k)^b / G with a = beta / (alpha + beta),
b = alpha / (alpha + beta), G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
GRID = {
    "a": np.arange(0.0, 25.1, 5.0),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "b": np.arange(0.0, 25.1, 5.0),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
}
LOG_RSTAR_GRID = np.log([2.0, 5.0, 15.0, 50.0])
PARAMS = ("E", "A", "alpha", "B", "beta")


@dataclass
class Law:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta (+ R* for repeated data)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    R_star: float | None = None
    objective: float = float("nan")
    """Huber objective at the optimum (sum over points)."""
    num_points: int = 0

    @property
    def a(self) -> float:
        """Exponent of N*(C) ∝ C^a (nan unless both exponents are > 0: no finite optimum)."""
        return self.beta / (self.alpha + self.beta) if self.alpha > 0 and self.beta > 0 else float("nan")

    @property
    def b(self) -> float:
        """Exponent of D*(C) ∝ C^b."""
        return self.alpha / (self.alpha + self.beta) if self.alpha > 0 and self.beta > 0 else float("nan")

    @property
    def G(self) -> float:
        if not (self.alpha > 0 and self.beta > 0):
            return float("nan")
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def effective_data(self, D, unique=None) -> np.ndarray:
        return effective_data(D, unique, self.R_star)

    def predict(self, N, D, unique=None) -> np.ndarray:
        Deff = self.effective_data(D, unique)
        return self.E + self.A / np.asarray(N, np.float64) ** self.alpha + self.B / Deff ** self.beta

    def optimal(self, C, k: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """(N*(C), D*(C)) minimising L at compute C = k N D (no repetition)."""
        C = np.asarray(C, np.float64) / k
        return self.G * C ** self.a, C ** self.b / self.G

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(a=self.a, b=self.b, G=self.G)
        return out


def effective_data(D, unique=None, R_star: float | None = None) -> np.ndarray:
    """Muennighoff's D' = U + U R* (1 - exp(-R / R*)), R = D / U - 1 (D itself without U or R*)."""
    D = np.asarray(D, np.float64)
    if unique is None or R_star is None:
        return D
    U = np.asarray(unique, np.float64)
    R = np.maximum(D / U - 1.0, 0.0)
    return np.where(R > 0, U + U * R_star * (-np.expm1(-R / R_star)), D)


# --------------------------------------------------------------------------- the objective
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative, elementwise."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def _objective(theta: np.ndarray, logN, D, U, logL, delta: float, with_rstar: bool):
    """Huber sum and gradient of theta = (a, alpha, b, beta, e[, log R*])."""
    a, alpha, b, beta, e = theta[:5]
    if with_rstar:
        rstar = math.exp(theta[5])
        R = np.maximum(D / U - 1.0, 0.0)
        sat = -np.expm1(-R / rstar)
        Deff = np.where(R > 0, U + U * rstar * sat, D)
        # d Deff / d log R* = U R* (sat - (R / R*) exp(-R / R*))
        dDeff = np.where(R > 0, U * rstar * (sat - (R / rstar) * np.exp(-R / rstar)), 0.0)
    else:
        Deff = D
    logD = np.log(Deff)
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    top = terms.max(0)
    w = np.exp(terms - top)
    s = w.sum(0)
    pred = top + np.log(s)
    w /= s
    value, dr = _huber(pred - logL, delta)
    grad = [np.sum(dr * w[0]), np.sum(dr * w[0] * -logN), np.sum(dr * w[1]), np.sum(dr * w[1] * -logD), np.sum(dr * w[2])]
    if with_rstar:
        grad.append(np.sum(dr * w[1] * -beta * dDeff / Deff))
    return float(value.sum()), np.array(grad)


def _grid_values(logN, logD, logL, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Every grid point (k, 5) and its objective (k,), evaluated at once."""
    grid = np.array(list(itertools.product(GRID["a"], GRID["alpha"], GRID["b"], GRID["beta"], GRID["e"])))
    t1 = grid[:, :1] - grid[:, 1:2] * logN[None]
    t2 = grid[:, 2:3] - grid[:, 3:4] * logD[None]
    t3 = np.broadcast_to(grid[:, 4:5], t1.shape)
    pred = np.logaddexp(np.logaddexp(t1, t2), t3)
    value, _ = _huber(pred - logL[None], delta)
    return grid, value.sum(1)


def _check_points(N, D, loss, unique):
    N, D, L = (np.asarray(v, np.float64).ravel() for v in (N, D, loss))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and loss must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    for name, v in (("N", N), ("D", D), ("loss", L)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be finite and > 0 for every run, got {v[~(np.isfinite(v) & (v > 0))][:3]}")
    U = None
    if unique is not None:
        U = np.asarray(unique, np.float64).ravel()
        if len(U) != len(N) or not np.all(np.isfinite(U)) or np.any(U <= 0):
            raise ValueError("unique (data seen once) must be finite, > 0 and given for every run")
    if len(N) < 5:
        raise ValueError(f"fitting L(N, D) needs at least 5 runs (5 parameters), got {len(N)}")
    return N, D, L, U


#: Repetition below this fraction (D / unique - 1) fits no R*: a step past one epoch is no
#: evidence about repeated data, and R* is then unconstrained.
MIN_REPETITION = 0.05


def fit_law(N, D, loss, *, unique=None, delta: float = HUBER_DELTA, starts: int = 16,
            init: list[np.ndarray] | None = None, fit_rstar: bool | None = None) -> Law:
    """Fit L(N, D) (+ R* when `unique` shows repeated data) to one loss per run (see module doc).

    `starts` grid points (best by objective) and any `init` vectors (a, alpha, b, beta, e[, log R*])
    are refined with L-BFGS; the lowest objective wins. fit_rstar: None = when some run repeats.
    """
    N, D, L, U = _check_points(N, D, loss, unique)
    logN, logL = np.log(N), np.log(L)
    if fit_rstar is None:
        fit_rstar = U is not None and bool(np.any(D / U > 1.0 + MIN_REPETITION))
    if fit_rstar and U is None:
        raise ValueError("fitting R* needs the unique data size of every run")
    grid, values = _grid_values(logN, np.log(D), logL, delta)
    order = np.argsort(values)[: max(1, starts)]
    inits = [grid[i] for i in order] + [np.asarray(v, np.float64)[:5] for v in (init or [])]
    if fit_rstar:
        inits = [np.append(x, r) for x in inits for r in LOG_RSTAR_GRID]
        inits += [np.asarray(v, np.float64) for v in (init or []) if len(v) == 6]
    best = None
    for x0 in inits:
        res = minimize(_objective, x0, args=(logN, D, U, logL, delta, fit_rstar), jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, alpha, b, beta, e = best.x[:5]
    if max(a, b, e) > 700:  # exp overflows: a coefficient ran off (a degenerate resample, a flat direction)
        raise ValueError(f"the fit diverged (log A = {a:.3g}, log B = {b:.3g}, log E = {e:.3g})")
    return Law(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta),
               R_star=math.exp(best.x[5]) if fit_rstar else None, objective=float(best.fun), num_points=len(N))


def law_vector(law: Law) -> np.ndarray:
    """(a, alpha, b, beta, e[, log R*]) of a fitted law: an `init` for `fit_law`."""
    x = [math.log(law.A), law.alpha, math.log(law.B), law.beta, math.log(law.E)]
    return np.array(x + ([math.log(law.R_star)] if law.R_star is not None else []))


@dataclass
class Bootstrap:
    """Percentile intervals of the law's parameters over fits to runs resampled with replacement."""

    level: float
    resamples: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"level": self.level, "resamples": self.resamples,
                "intervals": {k: list(v) for k, v in self.intervals.items()}}


def bootstrap_law(N, D, loss, *, unique=None, resamples: int = 200, level: float = 0.95, seed: int = 0,
                  starts: int = 2, law: Law | None = None, delta: float = HUBER_DELTA) -> Bootstrap:
    """Refit on `resamples` resamplings of the runs (with replacement); each refit starts from the
    full-data optimum and its own `starts` best grid points. Intervals: equal-tailed percentiles."""
    N, D, L, U = _check_points(N, D, loss, unique)
    law = law or fit_law(N, D, L, unique=U, delta=delta)
    fit_rstar = law.R_star is not None
    rng = np.random.default_rng(seed)
    names = list(PARAMS) + ["a", "b"] + (["R_star"] if fit_rstar else [])
    samples: dict[str, list[float]] = {k: [] for k in names}
    n = len(N)
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) < 5:
            continue
        try:
            fit = fit_law(N[idx], D[idx], L[idx], unique=None if U is None else U[idx], delta=delta, starts=starts,
                          init=[law_vector(law)], fit_rstar=fit_rstar)
        except ValueError:
            continue
        for k in names:
            samples[k].append(float(getattr(fit, k)))
    tail = 100 * (1 - level) / 2
    intervals = {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in samples.items() if v}
    return Bootstrap(level, len(samples["E"]), intervals, samples)


# --------------------------------------------------------------------------- IsoFLOP profiles
@dataclass
class IsoFlop:
    """IsoFLOP analysis: per budget, the parabola L(log N) and its minimum; the exponent fits."""

    budgets: list[dict]
    """[{C, N: [...], loss: [...], coeffs: [c2, c1, c0] of L = c2 x^2 + c1 x + c0 in x = log N,
    N_opt, D_opt, loss_opt}], budgets with a minimum inside their N range only."""
    a: float | None = None
    """N_opt ∝ C^a (least squares in log-log, needs >= 2 budgets)."""
    b: float | None = None
    """D_opt ∝ C^b."""
    skipped: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def group_budgets(flops, rel_tol: float = 0.1) -> np.ndarray:
    """Group runs whose compute agrees within rel_tol (in log): (n,) group index, in order of C."""
    logC = np.log(np.asarray(flops, np.float64))
    order = np.argsort(logC)
    groups = np.empty(len(logC), dtype=int)
    g, anchor = -1, None
    for i in order:
        if anchor is None or logC[i] - anchor > math.log1p(rel_tol):
            g, anchor = g + 1, logC[i]
        groups[i] = g
    return groups


def isoflop_analysis(N, D, loss, flops, *, budget=None, rel_tol: float = 0.1) -> IsoFlop:
    """For each compute budget (runs grouped by `budget` labels, else by flops within rel_tol), fit
    L = c2 (log N)^2 + c1 log N + c0 over >= 3 distinct N; the vertex is N_opt (kept only if it lies
    within the budget's N range and c2 > 0) and D_opt = the data at N_opt, interpolated in log.
    Then N_opt ∝ C^a and D_opt ∝ C^b by least squares over the kept budgets (>= 2)."""
    N, D, L, C = (np.asarray(v, np.float64).ravel() for v in (N, D, loss, flops))
    keys = group_budgets(C, rel_tol) if budget is None else np.unique(np.asarray(budget, np.float64), return_inverse=True)[1]
    kept, skipped = [], []
    for g in np.unique(keys):
        sel = keys == g
        x, y, d = np.log(N[sel]), L[sel], np.log(D[sel])
        Cg = float(np.exp(np.mean(np.log(C[sel]))))
        info = {"C": Cg, "N": N[sel].tolist(), "loss": y.tolist()}
        if len(np.unique(x)) < 3:
            skipped.append({**info, "why": "fewer than 3 model sizes"})
            continue
        c2, c1, c0 = np.polyfit(x, y, 2)
        x_opt = -c1 / (2 * c2) if c2 > 0 else float("nan")
        if not (c2 > 0 and x.min() <= x_opt <= x.max()):
            skipped.append({**info, "why": "no minimum inside the sizes trained (extend the ladder)"})
            continue
        order = np.argsort(x)
        d_opt = float(np.interp(x_opt, x[order], d[order]))
        kept.append({**info, "coeffs": [float(c2), float(c1), float(c0)], "N_opt": float(np.exp(x_opt)),
                     "D_opt": float(np.exp(d_opt)), "loss_opt": float(c0 + c1 * x_opt + c2 * x_opt ** 2)})
    result = IsoFlop(kept, skipped=skipped)
    if len(kept) >= 2:
        logC = np.log([k["C"] for k in kept])
        result.a = float(np.polyfit(logC, np.log([k["N_opt"] for k in kept]), 1)[0])
        result.b = float(np.polyfit(logC, np.log([k["D_opt"] for k in kept]), 1)[0])
    return result
