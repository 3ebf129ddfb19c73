"""Evaluations of trained jetfm models beyond the training loss.

    from jetfm.evaluation import evaluate_generative
    result = evaluate_generative("gen/joint", "data/toptag", out_dir="gen/joint/evaluation")

`jetfm evaluate generative` (generative.py): generated jets vs reference jets — KL divergence
in quantile bins and Wasserstein-1 per observable, KPD/FPD, plots, MLflow.
"""

from .generative import add_generative_arguments, evaluate_generative, run_generative

__all__ = ["add_generative_arguments", "evaluate_generative", "run_generative"]
