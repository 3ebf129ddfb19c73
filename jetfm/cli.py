"""The `jetfm` command: data preparation and everything around training.

    jetfm data generate OUT --preset toptag --train 10000 --val 2000 --test 2000 --workers 2
    jetfm data convert jetclass 'JetClass/train_100M/*.root' --out data/jetclass --split train
    jetfm data convert toptag train.h5 --out data/toptag --split train
    jetfm data inspect data/toptag
    jetfm data tokenize --tokenizer runs/tokenizer/final --data data/toptag --out data/toptag-tokens
    jetfm demo                                   # the whole chain, small, on CPU

Training itself: `accelerate launch jetfm/train.py --config configs/joint.yaml` (or `jetfm train`).
Each subcommand answers `--help`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import messages
from .data.format import DataError

# (module, add-arguments function, run function, one-line help)
DATA_COMMANDS = {
    "generate": ("jetfm.data.generate", "add_generate_arguments", "run_generate",
                 "generate jets with Pythia 8 + FastJet (the embedded default data)"),
    "convert": ("jetfm.data.convert", "add_convert_arguments", "run_convert",
                "convert JetClass ROOT or top-tagging HDF5 files into shards"),
    "inspect": ("jetfm.data.inspect", "add_inspect_arguments", "run_inspect",
                "summarise a shard set and plot jet mass, pT and multiplicity per class"),
    "tokenize": ("jetfm.tokenizer.tokenize", "add_tokenize_arguments", "run_tokenize",
                 "add token ids (and reconstructed features) to a shard set with a trained tokenizer"),
}
EVALUATE_COMMANDS = {
    "generative": ("jetfm.evaluation.generative", "add_generative_arguments", "run_generative",
                   "compare generated jets with reference jets: distributions, KL, W1, plots"),
    "classifier": ("jetfm.finetune.evaluate", "add_classifier_arguments", "run_classifier",
                   "accuracy, AUC, background rejection, ROC and confusion of a fine-tuned classifier"),
}
TOP_COMMANDS = {
    "generate": ("jetfm.generate", "add_generate_arguments", "run_generate",
                 "sample jets from a pre-trained NTP/joint model (KV cache) into shards"),
    "sweep": ("jetfm.sweep", "add_sweep_arguments", "run_sweep",
              "run a study: fine-tunings over data sizes, or pre-training scaling (sizes x data x compute) and its fit"),
    "demo": ("jetfm.demo", "add_demo_arguments", "run_demo",
             "run the whole chain small on CPU: data → tokenizer → pre-training → generation → fine-tuning → report"),
}


def _add(subparsers, name: str, spec: tuple) -> None:
    module_name, add_name, run_name, help_text = spec
    parser = subparsers.add_parser(name, help=help_text, description=help_text,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:  # an optional part missing (not a bug inside it): say so when used
        if error.name is None or not module_name.startswith(error.name):
            raise
        parser.set_defaults(_unavailable=f"`{name}` is unavailable: {error}")
        return
    getattr(module, add_name)(parser)
    parser.set_defaults(_run=getattr(module, run_name))


def _train(argv: list[str]) -> int:
    from . import train

    return train.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetfm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = commands.add_parser("data", help="generate, convert, inspect and tokenize jet shards")
    data_commands = data.add_subparsers(dest="data_command", metavar="STEP")
    for name, spec in DATA_COMMANDS.items():
        _add(data_commands, name, spec)
    evaluate = commands.add_parser("evaluate", help="evaluate generated jets or a classifier")
    evaluate_commands = evaluate.add_subparsers(dest="evaluate_command", metavar="WHAT")
    for name, spec in EVALUATE_COMMANDS.items():
        _add(evaluate_commands, name, spec)
    for name, spec in TOP_COMMANDS.items():
        _add(commands, name, spec)
    commands.add_parser("train", help="train a stage: same as `python jetfm/train.py` (see `jetfm train --help`)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        parser.error(args._unavailable)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except DataError as error:
        messages.error(str(error))
        return 2
    except KeyboardInterrupt:
        messages.info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
