"""Scaling-study tools on the command line.

    python -m jetfm.scaling fit RUNS_DIR_OR_JSON --out DIR [--objective ntp mpm] [--bootstrap 200]
    python -m jetfm.scaling ladder configs/scaling/ladder.yaml --config configs/joint.yaml --codebook-size 512

`fit` reads run records (a JSON list, or every summary.json under a directory of runs), fits
L(N, D) per objective with bootstrap intervals and writes DIR/study.md, DIR/fit.json and the
plots (jetfm/scaling/report.py). `ladder` prints the model-size ladder's parameter counts on a
base pre-training config (jetfm/scaling/ladder.py). Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from .report import DATA_UNITS, OBJECTIVES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jetfm.scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit the scaling law to finished runs and write the report")
    fit.add_argument("runs", metavar="RUNS_DIR_OR_JSON", help="a directory of runs (summary.json) or a JSON list of records")
    fit.add_argument("--out", required=True, metavar="DIR", help="output directory (study.md, fit.json, *.png)")
    fit.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=None, help="objectives to fit (default: all present)")
    fit.add_argument("--bootstrap", type=int, default=200, metavar="K", help="bootstrap refits for the intervals (0: none)")
    fit.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--data-unit", choices=DATA_UNITS, default="particles",
                     help="D in particles seen (default) or jets seen (run directories only)")
    ladder = commands.add_parser("ladder", help="print a model-size ladder's parameter counts")
    ladder.add_argument("ladder", metavar="LADDER_YAML")
    ladder.add_argument("--config", required=True, metavar="YAML", help="the study's base pre-training config")
    ladder.add_argument("--codebook-size", type=int, required=True, help="the tokenizer's codebook size (vocabulary - 2)")
    ladder.add_argument("--num-classes", type=int, default=0, help="classes (for model.conditioning=class)")
    ladder.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the base config")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jetfm.config import ConfigError

    from .report import RecordError

    try:
        if args.command == "ladder":
            from jetfm.config_io import load_config

            from .ladder import build_ladder, format_ladder, load_ladder

            cfg = load_config(args.config, args.overrides)
            rungs = build_ladder(load_ladder(args.ladder), cfg, vocab_size=args.codebook_size + 2,
                                 num_classes=args.num_classes)
            print(format_ladder(rungs))
            return 0
        from .report import load_records, write_report

        if args.bootstrap < 0 or not 0 < args.level < 1:
            raise RecordError("--bootstrap must be >= 0 and --level in (0, 1)")
        records, skipped = load_records(args.runs, args.data_unit)
        result = write_report(records, args.out, skipped=skipped, objectives=args.objective, bootstrap=args.bootstrap,
                              seed=args.seed, level=args.level, data_unit=args.data_unit)
    except (ConfigError, RecordError, ValueError) as error:
        print(f"jetfm scaling: {error}", file=sys.stderr)
        return 2
    for obj, res in result["objectives"].items():
        law = res.get("law")
        text = (f"alpha {law['alpha']:.3f}, beta {law['beta']:.3f}, E {law['E']:.4g}, a {law['a']:.3f}, b {law['b']:.3f}"
                if law else "; ".join(res["notes"]))
        print(f"{obj}: {res['runs']} runs: {text}")
    print(f"wrote {args.out}/study.md, fit.json and {len(result['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
