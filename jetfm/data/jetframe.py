"""The jet frame: where generated jets live, and how decoded particles become physical jets.

Generated jets carry no absolute direction: particles are placed at (η_rel, φ_rel) around
η = φ = 0 as massless four-momenta (px, py, pz, E) in GeV, pT-sorted within each jet (the shard
contract), and the jet features are the summed constituents (physics.jets_from_constituents).
jetfm.evaluation puts reference jets in the same frame before comparing. A decoded pT below
PT_FLOOR (a log-pT far below the data) is raised to PT_FLOOR and counted. Non-finite values are
a DataError before any jet of the batch is written.
"""

from __future__ import annotations

import numpy as np

from .features import four_momenta_from_relative
from .format import JET_FEATURES, DataError, JetArrays
from .physics import jets_from_constituents

#: Split name of generated shard sets.
GENERATED_SPLIT = "generated"
#: Smallest particle pT written (GeV); decoded values below it are raised to it (and counted).
PT_FLOOR = 1e-3
#: The features a tokenizer must decode for jets to be turned into four-momenta.
RELATIVE_FEATURES = ("part_pt", "part_etarel", "part_phirel")
#: How generated jets' coordinates are defined (recorded in the manifest).
JET_FRAME = ("jet frame: particles placed at (eta_rel, phi_rel) around eta = phi = 0, massless; "
             "absolute jet eta/phi carry no information")


def jet_frame_jets(pt, etarel, phirel, offsets, labels, tokens=None) -> tuple[JetArrays, int]:
    """JetArrays in the jet frame from per-particle (pT [GeV], η_rel, φ_rel): massless four-momenta
    around η = φ = 0, pT-sorted within each jet, jet features from the summed constituents.
    Returns (jets, number of particles whose pT was raised to PT_FLOOR)."""
    pt = np.asarray(pt, np.float64)
    offsets = np.asarray(offsets, np.int64)
    clamped = int(np.sum(~(pt >= PT_FLOOR)))
    pt = np.where(pt >= PT_FLOOR, pt, PT_FLOOR)  # also replaces NaN pT; NaN elsewhere is caught below
    counts = np.diff(offsets)
    jet_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-pt, jet_of))  # by jet, then pT descending
    zeros = np.zeros(len(pt))
    p4 = four_momenta_from_relative(pt, np.asarray(etarel, np.float64), np.asarray(phirel, np.float64), zeros, zeros)[order]
    summed = jets_from_constituents(p4, offsets)
    jet = np.stack([summed[name] for name in JET_FEATURES], axis=1)
    jets = JetArrays(
        part=p4.astype(np.float32), offsets=offsets, jet=jet.astype(np.float32),
        label=np.asarray(labels, np.int64), tokens=None if tokens is None else np.asarray(tokens)[order].astype(np.int32),
    )
    bad_B = ~np.isfinite(jets.jet).all(1)
    bad_B[jet_of[~np.isfinite(jets.part).all(1)]] = True  # rows are sorted within jets: same jet index
    if bad_B.any():
        raise DataError(f"{int(bad_B.sum())} jets with non-finite values after inverting the preprocessing "
                        f"(first: jet {int(np.argmax(bad_B))} of this batch); stopped before writing them")
    return jets, clamped


def to_physical(generated, tokenizer, labels=None) -> tuple[JetArrays, dict]:
    """Generated jets (jetfm.sampling.GeneratedJets: decoded, tokenizer-preprocessed features) ->
    jet-frame JetArrays + counts (pT raised to the floor, jets not sampled in pT order)."""
    names = list(tokenizer.feature_names)
    raw = tokenizer.preprocessing.inverse(generated.features.numpy())
    pt, etarel, phirel = (raw[:, names.index(n)] for n in RELATIVE_FEATURES)
    if labels is None:
        labels = np.zeros(generated.num_jets, np.int64)
    offsets = generated.cu_seqlens.numpy().astype(np.int64)
    jets, clamped = jet_frame_jets(pt, etarel, phirel, offsets, labels, generated.tokens.numpy())
    # how often the sampled order was not pT-descending (the order the model was trained on)
    counts = np.diff(offsets)
    jet_of = np.repeat(np.arange(len(counts)), counts)
    rising = np.zeros(len(counts), bool)
    if len(pt) > 1:
        same_jet = jet_of[1:] == jet_of[:-1]
        np.logical_or.at(rising, jet_of[1:][same_jet], pt[1:][same_jet] > pt[:-1][same_jet])
    return jets, {"pt_clamped": clamped, "jets_not_pt_ordered": int(rising.sum())}
