"""Scaling studies of pre-training: model-size ladder, analytic FLOPs, law fits and the report.

    jetfm.scaling.ladder   named sizes and their parameter counts N (configs/scaling/ladder.yaml)
    jetfm.scaling.flops    FLOPs of one pre-training step from shapes and multiplicities
    jetfm.scaling.fit      L(N, D) = E + A/N^alpha + B/D^beta, bootstrap, IsoFLOP, repetition
    jetfm.scaling.report   run records -> study.md, fit.json, plots; `python -m jetfm.scaling fit`

Method and conventions: docs/SCALING.md.
"""
