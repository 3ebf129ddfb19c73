"""Evaluation metrics and plots for generation (docs/METHOD.md §4) and classification (§5).

Pure numpy/matplotlib (FastJet optional, for N-subjettiness axes); no models:

    from jetfm.metrics import jet_observables, particle_observables, compare_samples, format_table
    rows = compare_samples(jet_observables(reference_jets), jet_observables(generated_jets))

    from jetfm.metrics import classification_report, format_report
    print(format_report(classification_report(labels, probs, class_names)))
"""

from .classification import (
    Rejection,
    accuracy,
    auc,
    background_rejection,
    classification_report,
    confusion_matrix,
    format_report,
    roc_curve,
    roc_curves_vs_background,
)
from .distances import (
    bootstrap_w1,
    compare_samples,
    format_table,
    fpd,
    kl_divergence_quantile_bins,
    kpd,
    stack_observables,
    wasserstein_1d,
)
from .observables import (
    JET_OBSERVABLES,
    PARTICLE_OBSERVABLES,
    collect_observables,
    jet_observables,
    nsubjettiness,
    particle_observables,
)
from .plots import plot_confusion, plot_distributions, plot_roc, plot_scaling

__all__ = [
    "JET_OBSERVABLES", "PARTICLE_OBSERVABLES", "Rejection", "accuracy", "auc", "background_rejection",
    "bootstrap_w1", "classification_report", "collect_observables", "compare_samples", "confusion_matrix",
    "format_report", "format_table", "fpd", "jet_observables", "kl_divergence_quantile_bins", "kpd",
    "nsubjettiness", "particle_observables", "plot_confusion", "plot_distributions", "plot_roc",
    "plot_scaling", "roc_curve", "roc_curves_vs_background", "stack_observables", "wasserstein_1d",
]
