"""jetfm.metrics: observables (N-subjettiness by hand), distances, classification vs sklearn, plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from jetfm.data.format import JetArrays
from jetfm.metrics import (
    accuracy,
    auc,
    background_rejection,
    classification_report,
    collect_observables,
    compare_samples,
    confusion_matrix,
    format_report,
    format_table,
    fpd,
    jet_observables,
    kl_divergence_quantile_bins,
    kpd,
    nsubjettiness,
    particle_observables,
    plot_confusion,
    plot_distributions,
    plot_roc,
    plot_scaling,
    roc_curve,
    roc_curves_vs_background,
    wasserstein_1d,
)
from jetfm.metrics.distances import _mmd2_unbiased
from jetfm.metrics.observables import exclusive_kt_axes


# ----------------------------------------------------------------------------- helpers
def massless(pt, eta, phi) -> np.ndarray:
    """(n, 4) px, py, pz, E of massless particles."""
    pt, eta, phi = (np.atleast_1d(np.asarray(v, np.float64)) for v in (pt, eta, phi))
    return np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], axis=1)


def ragged(*jets) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(j) for j in jets])]).astype(np.int64)
    return np.concatenate(jets), offsets


def random_jets(n_jets, seed, mean_mult=30):
    """Massive-particle toy jets with 1-3 prongs around random axes (phi near +-pi included)."""
    rng = np.random.default_rng(seed)
    mult = np.clip(rng.poisson(mean_mult, n_jets), 1, 128)
    jet_of = np.repeat(np.arange(n_jets), mult)
    prong_eta, prong_phi = rng.normal(0, 0.3, (2, n_jets, 3))
    which = rng.integers(0, 3, len(jet_of))
    eta = rng.uniform(-2, 2, n_jets)[jet_of] + prong_eta[jet_of, which] + rng.normal(0, 0.05, len(jet_of))
    phi = rng.uniform(-np.pi, np.pi, n_jets)[jet_of] + prong_phi[jet_of, which] + rng.normal(0, 0.05, len(jet_of))
    p4 = massless(rng.exponential(10, len(jet_of)) + 0.5, eta, phi)
    p4[:, 3] = np.sqrt(p4[:, 3] ** 2 + 0.14**2)
    return p4, np.concatenate([[0], np.cumsum(mult)]).astype(np.int64)


# ------------------------------------------------------------------------- observables
def test_two_particle_jet_tau_and_mass_by_hand():
    # equal pT at eta 0, phi +-0.3: the summed axis is (0, 0), each particle is dR = 0.3 from it
    p4, offsets = ragged(massless([100.0, 100.0], [0.0, 0.0], [0.3, -0.3]))
    obs = jet_observables((p4, offsets))
    assert obs["jet_tau1"][0] == pytest.approx((100 * 0.3 + 100 * 0.3) / (200 * 0.8), rel=1e-9)  # 0.375
    assert obs["jet_tau2"][0] == 0.0 and obs["jet_tau3"][0] == 0.0
    assert obs["jet_tau21"][0] == 0.0 and obs["jet_tau32"][0] == 0.0  # 0/x and 0/0 -> 0 by convention
    # m^2 = 2 pT1 pT2 (cosh deta - cos dphi) = 2 * 100 * 100 * (1 - cos 0.6)
    assert obs["jet_mass"][0] == pytest.approx(200 * math.sin(0.3), rel=1e-9)
    assert obs["jet_nparticles"][0] == 2
    part = particle_observables((p4, offsets))
    np.testing.assert_allclose(part["part_phirel"], [0.3, -0.3], atol=1e-6)
    np.testing.assert_allclose(part["part_etarel"], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(part["part_ptrel"], 100 / (200 * math.cos(0.3)), rtol=1e-6)


def test_back_to_back_massless_pair_mass():
    p4 = np.array([[50.0, 0, 0, 50.0], [-50.0, 0, 0, 50.0]])
    obs = jet_observables((p4, np.array([0, 2])))
    assert obs["jet_mass"][0] == pytest.approx(100.0)
    assert obs["jet_pt"][0] == pytest.approx(0.0, abs=1e-9)


def test_three_particle_jet_tau_by_hand_across_phi_wrap():
    # all at eta 1.3 (the rapidity of any sum of them is exactly 1.3), phi near pi so C wraps:
    # A, B (pT 100, dphi 0.2) are the kT-closest pair (d = 100^2 0.2^2 = 400 < 50^2 0.8^2 = 1600)
    eta0, phi0 = 1.3, 3.0
    phis = np.array([phi0, phi0 + 0.2, phi0 + 1.0])  # C at 4.0 rad = -2.28 after wrapping
    pts = np.array([100.0, 100.0, 50.0])
    p4, offsets = ragged(massless(pts, [eta0] * 3, np.angle(np.exp(1j * phis))))
    obs = jet_observables((p4, offsets))
    # 2 axes: A+B at phi0 + 0.1 and C itself
    tau2 = (100 * 0.1 + 100 * 0.1 + 50 * 0.0) / (250 * 0.8)
    # 1 axis: the summed four-vector, at phi_axis = atan2(sum py, sum px), same eta
    phi_axis = math.atan2(np.sum(pts * np.sin(phis)), np.sum(pts * np.cos(phis)))
    dphi = np.abs(np.angle(np.exp(1j * (phis - phi_axis))))
    tau1 = np.sum(pts * dphi) / (250 * 0.8)
    assert obs["jet_tau1"][0] == pytest.approx(tau1, rel=1e-9)
    assert obs["jet_tau2"][0] == pytest.approx(tau2, rel=1e-9)
    assert obs["jet_tau3"][0] == 0.0 and obs["jet_tau32"][0] == 0.0
    assert obs["jet_tau21"][0] == pytest.approx(tau2 / tau1, rel=1e-9)
    np.testing.assert_allclose(nsubjettiness(p4, offsets)[0], [tau1, tau2, 0.0], rtol=1e-9)


def test_jets_with_fewer_particles_than_axes_and_jetarrays_input():
    one = massless([80.0], [0.5], [1.0])
    four = massless([40.0, 30.0, 20.0, 10.0], [0.0, 0.1, -0.2, 0.3], [0.0, 0.2, 0.1, -0.3])
    p4, offsets = ragged(one, four, one)
    jets = JetArrays(part=np.c_[p4, np.ones(len(p4))].astype(np.float32), offsets=offsets,
                     jet=np.zeros((3, 6), np.float32), label=np.zeros(3, np.int64))
    obs = jet_observables(jets)
    np.testing.assert_array_equal(obs["jet_nparticles"], [1, 4, 1])
    for name in ("jet_tau1", "jet_tau2", "jet_tau3", "jet_tau21", "jet_tau32"):
        assert obs[name][0] == 0.0 and obs[name][2] == 0.0, name
    assert 0 < obs["jet_tau3"][1] < obs["jet_tau2"][1] < obs["jet_tau1"][1]
    assert np.isfinite(np.concatenate(list(obs.values()))).all()


def test_collect_observables_over_chunks_stops_at_max_jets():
    def chunk(seed, n):
        p4, offsets = random_jets(n, seed)
        return JetArrays(part=p4.astype(np.float32), offsets=offsets, jet=np.zeros((n, 6), np.float32),
                         label=np.zeros(n, np.int64))

    chunks = [chunk(10, 4), chunk(11, 5), chunk(12, 6)]
    jet_obs, part_obs = collect_observables(chunks, max_jets=7)
    assert all(len(v) == 7 for v in jet_obs.values())
    expected_particles = chunks[0].n_particles + int(chunks[1].multiplicity[:3].sum())
    assert all(len(v) == expected_particles for v in part_obs.values())
    np.testing.assert_allclose(jet_obs["jet_mass"][4:], jet_observables(chunks[1].select(np.arange(3)))["jet_mass"])


def test_tau_n_decreases_with_n_also_for_jets_with_few_particles():
    big_p4, big_offsets = random_jets(300, seed=1, mean_mult=25)
    small_p4, small_offsets = random_jets(100, seed=2, mean_mult=2)  # many jets with <= 3 particles
    p4 = np.concatenate([big_p4, small_p4])
    offsets = np.concatenate([big_offsets, small_offsets[1:] + big_offsets[-1]])
    tau = nsubjettiness(p4, offsets, n_max=4)
    assert (tau[:300] > 0).all()  # the check is not vacuous
    # tau_N decreases with N for every jet with more than N particles
    assert (np.diff(tau[:300], axis=1) <= 1e-12).all()
    counts = np.diff(offsets)
    for n in range(1, 5):
        assert (tau[counts <= n, n - 1] == 0).all()


def test_kt_axes_conserve_the_jet_momentum():
    p4, offsets = random_jets(50, seed=3)
    axes = exclusive_kt_axes(p4, offsets, [1, 2, 3])
    total = np.add.reduceat(p4, offsets[:-1], axis=0)
    for n in (1, 2, 3):
        np.testing.assert_allclose(axes[n].sum(axis=1), total, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- distances
def test_kl_and_w1_vanish_for_same_distribution_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20_000), rng.normal(size=20_000)
    assert kl_divergence_quantile_bins(a, b) < 0.01
    assert wasserstein_1d(a, b) < 0.03
    shifted = rng.normal(0.5, 1.0, size=20_000)
    assert wasserstein_1d(a, shifted) == pytest.approx(0.5, rel=0.1)
    assert kl_divergence_quantile_bins(a, shifted) > 0.05


def test_kl_by_hand_and_empty_bins_are_finite():
    # 2 bins split at the reference median 1.5: p = (1/2, 1/2), q = (3/4, 1/4)
    kl = kl_divergence_quantile_bins([0, 1, 2, 3], [0, 0, 0, 3], n_bins=2)
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-5)
    rng = np.random.default_rng(1)
    empty = kl_divergence_quantile_bins(rng.normal(size=1000), np.full(1000, 0.01))
    assert np.isfinite(empty) and empty > 2.0
    # discrete observable: repeated quantile edges merge; same distribution still ~0
    counts_a, counts_b = rng.poisson(30, 20_000), rng.poisson(30, 20_000)
    assert kl_divergence_quantile_bins(counts_a, counts_b) < 0.01


def test_w1_by_hand_and_against_scipy():
    # F_a - F_b = 1/2 - 2/3 on [0, 1), 1 - 2/3 on [1, 3): W1 = 1/6 + 2/3
    assert wasserstein_1d([0.0, 1.0], [0.0, 0.0, 3.0]) == pytest.approx(5 / 6)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=137), rng.exponential(size=59)
    assert wasserstein_1d(a, b) == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)


def test_compare_samples_rows_and_bootstrap():
    rng = np.random.default_rng(3)
    ref = {"x": rng.normal(size=4000), "n": rng.poisson(20, 4000).astype(float)}
    gen = {"x": rng.normal(0.5, 1, size=3000), "n": rng.poisson(20, 3000).astype(float), "extra": np.zeros(5)}
    rows = compare_samples(ref, gen, n_bootstrap=5)
    assert [row["observable"] for row in rows] == ["x", "n"]
    x, n = rows
    assert x["w1"] == pytest.approx(0.5, rel=0.15) and 0 < x["w1_std"] < 0.1
    assert n["kl"] < x["kl"]
    assert math.isnan(compare_samples(ref, gen, ["x"])[0]["w1_std"])
    assert "| x |" in format_table(rows)
    with pytest.raises(KeyError):
        compare_samples(ref, gen, ["extra"])


def test_kpd_moment_formula_equals_direct_sum_and_separates():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 4)), rng.normal(0.3, 1.1, size=(200, 4))
    kxx, kyy, kxy = ((u @ v.T / 4 + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
    direct = ((kxx.sum() - np.trace(kxx)) / (300 * 299) + (kyy.sum() - np.trace(kyy)) / (200 * 199)
              - 2 * kxy.mean())
    assert _mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-9)
    ref, same, wider = rng.normal(size=(20_000, 5)), rng.normal(size=(20_000, 5)), 1.2 * rng.normal(size=(20_000, 5))
    same_mean, same_std = kpd(ref, same)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert kpd(ref, wider)[0] > 0.05
    assert fpd(ref, same) < 0.01
    # same covariance, mean shifted by 1 in one coordinate: FPD -> |dmu|^2 = 1
    assert fpd(ref, same + np.array([1.0, 0, 0, 0, 0]), standardise=False) == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------------ classification
def test_roc_auc_rejection_agree_with_sklearn_binary_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 4000)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)  # rounding makes many ties
    eff_b, eff_s, thresholds = roc_curve(labels, scores)
    fpr, tpr, thr = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(eff_b, fpr)
    np.testing.assert_allclose(eff_s, tpr)
    np.testing.assert_allclose(thresholds[1:], thr[1:])
    assert auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores), rel=1e-12)
    continuous = rng.normal(labels * 1.2, 1.0)
    fpr_c, tpr_c, _ = metrics.roc_curve(labels, continuous, drop_intermediate=False)
    for target in (0.1, 0.3, 0.5, 0.7):
        first = np.argmax(tpr_c >= target)
        assert background_rejection(labels, continuous, target).rejection == pytest.approx(1 / fpr_c[first])
    for target in (0.3, 0.5):
        result = background_rejection(labels, scores, target)
        first = np.argmax(tpr >= target)  # the documented rule: first ROC point reaching the target
        assert result.rejection == pytest.approx(1 / fpr[first])
        assert result.n_background == int((labels == 0).sum())
        assert result.n_background_passing == round(fpr[first] * result.n_background)


def test_macro_ovr_auc_accuracy_and_confusion_agree_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 4, 3000)
    logits = rng.normal(size=(3000, 4)) + 1.2 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert auc(labels, probs) == pytest.approx(
        metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), rel=1e-12
    )
    pred = probs.argmax(axis=1)
    assert accuracy(labels, probs) == pytest.approx(metrics.accuracy_score(labels, pred))
    assert accuracy(labels, pred) == accuracy(labels, probs)
    np.testing.assert_array_equal(confusion_matrix(labels, pred), metrics.confusion_matrix(labels, pred))
    np.testing.assert_allclose(confusion_matrix(labels, pred, normalize="true").sum(axis=1), 1.0)


def test_rejection_uncertainty_is_finite_and_shrinks_with_statistics():
    rng = np.random.default_rng(7)

    def sample(n):
        labels = np.r_[np.ones(n), np.zeros(n)]
        return labels, np.r_[rng.normal(1.5, 1, n), rng.normal(0, 1, n)]

    small = background_rejection(*sample(2_000), 0.5)
    large = background_rejection(*sample(200_000), 0.5)
    assert np.isfinite(small.uncertainty) and np.isfinite(large.uncertainty)
    assert large.uncertainty < small.uncertainty / 5  # ~ 1/sqrt(100) = 1/10
    # true 1/eps_B at eps_S = 0.5 for these Gaussians: 1 / (1 - Phi(1.5))
    assert large.rejection == pytest.approx(1 / 0.0668072, rel=0.05)
    # binomial propagation by hand
    eps = large.n_background_passing / large.n_background
    assert large.uncertainty == pytest.approx(math.sqrt(eps * (1 - eps) / large.n_background) / eps**2)


def test_rejection_with_no_background_passing_is_flagged():
    with pytest.warns(RuntimeWarning, match="no background"):
        result = background_rejection([1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.1, 0.2, 0.3], 0.5)
    rejection, uncertainty, n_pass, n_bkg = result
    assert rejection == math.inf and uncertainty == math.inf and (n_pass, n_bkg) == (0, 3)
    assert result.no_background_passed and result.lower_limit == pytest.approx(1.0)
    # the threshold is the ceil(eff * N_S)-th signal score: 0.5 * 4 -> 2nd highest (0.8) passes 1 of 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = background_rejection([1, 1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.85, 0.75, 0.1, 0.1], 0.5)
        assert (ok.rejection, ok.n_background_passing) == (4.0, 1)
        # 0.7 * 10 signal jets -> the cut is the 7th-highest signal score 0.4 (0.3 would pass 2)
        sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
        exact = background_rejection([1] * 10 + [0] * 4, sig + [0.85, 0.35, 0.05, 0.05], 0.7)
        assert exact.n_background_passing == 1


def test_classification_report_binary_and_multiclass():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, 2000)
    p_top = 1 / (1 + np.exp(-rng.normal(2.0 * labels - 1, 1.0)))
    probs = np.c_[1 - p_top, p_top]
    report = classification_report(labels, probs, ["QCD", "Tbqq"])
    assert report["signal_class"] == "Tbqq" and report["background_class"] == "QCD"
    direct = background_rejection(labels, p_top, 0.3)
    assert report["rejection@0.3"] == pytest.approx(direct.rejection)
    assert report["rejection@0.3_unc"] == pytest.approx(direct.uncertainty)
    assert report["auc"] == pytest.approx(auc(labels, p_top))
    assert report["accuracy"] == pytest.approx(np.mean((p_top >= 0.5) == labels))
    assert "Tbqq" in format_report(report)
    assert classification_report(labels, p_top, ["QCD", "Tbqq"])["rejection@0.3"] == report["rejection@0.3"]

    labels = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3)) + 1.0 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = classification_report(labels, probs, ["QCD", "Hbb", "Tbqq"], signal_class="Tbqq")
    assert set(report["classes"]) == {"QCD", "Hbb", "Tbqq"}
    assert "rejection@0.5" not in report["classes"]["QCD"]
    # JetClass-style: Tbqq vs QCD jets only, score p_T / (p_T + p_QCD)
    keep = (labels == 2) | (labels == 0)
    score = probs[keep, 2] / (probs[keep, 2] + probs[keep, 0])
    assert report["rejection@0.5"] == pytest.approx(background_rejection(labels[keep] == 2, score, 0.5).rejection)
    assert sum(row["n"] for row in report["classes"].values()) == 3000
    curves = roc_curves_vs_background(labels, probs, ["QCD", "Hbb", "Tbqq"])
    assert set(curves) == {"Hbb", "Tbqq"}


# ---------------------------------------------------------------------------------- plots
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.stat().st_size > 5_000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(9)
    ref = {"jet_mass": rng.normal(170, 15, 2000), "jet_nparticles": rng.poisson(60, 2000).astype(float),
           "part_ptrel": rng.exponential(0.02, 20000)}
    gen = {"jet_mass": rng.normal(165, 18, 1500), "jet_nparticles": rng.poisson(58, 1500).astype(float),
           "part_ptrel": rng.exponential(0.021, 15000)}
    paths = plot_distributions(ref, gen, tmp_path / "dist", annotations={"jet_mass": "KL = 0.01"})
    assert [p.name for p in paths] == ["jet_mass.png", "jet_nparticles.png", "part_ptrel.png"]
    assert all(_is_png(p) for p in paths)

    labels = rng.integers(0, 2, 1000)
    scores = rng.normal(labels, 1.0)
    eff_b, eff_s, _ = roc_curve(labels, scores)
    assert _is_png(plot_roc({"model": (eff_s, eff_b)}, tmp_path / "roc.png"))
    matrix = confusion_matrix(labels, (scores > 0.5).astype(int))
    assert _is_png(plot_confusion(matrix, ["QCD", "top"], tmp_path / "confusion.png"))
    series = {"scratch": ([0.7, 0.8, 0.9], [0.02, 0.01, 0.005]), "fine-tuned": ([0.8, 0.87, 0.92], None)}
    assert _is_png(plot_scaling([1e2, 1e3, 1e4], series, tmp_path / "scaling.png", "Training jets", "Accuracy"))
