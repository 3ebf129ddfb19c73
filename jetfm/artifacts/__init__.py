"""Where every artifact lives: atomic publishing, the stage exports, the MLflow runs behind them.

    jetfm.artifacts.atomic    write a file or a directory so readers see the old or the new one, never half
    jetfm.artifacts.exports   one exporter and one reader per stage (tokenizer, pretrain, classifier)
    jetfm.artifacts.runs      which MLflow run made an artifact; logging to it after training

Nothing is imported here, so that the lowest layers (data) can use `atomic` without pulling in
the model code that `exports` needs.
"""
