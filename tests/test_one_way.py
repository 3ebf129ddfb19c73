"""One way per concern, checked on the source (ast, nothing imported from the files scanned):
plots only in metrics/plots.py, command-line messages only through jetfm.messages, the JetClass
class list in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import jetfm

PACKAGE = Path(jetfm.__file__).parent
#: Files whose messages go through jetfm.messages (the jetfm command and the `jetfm data` steps).
MESSAGE_FILES = ["cli.py", "data/convert.py", "data/generate.py", "data/inspect.py", "tokenizer/tokenize.py",
                 "generate.py", "evaluation/generative.py", "finetune/evaluate.py", "finetune/model.py", "tracking.py",
                 "demo.py"]


def parsed(relative: str) -> ast.Module:
    path = PACKAGE / relative
    return ast.parse(path.read_text(), filename=str(path))


def test_only_metrics_plots_imports_matplotlib():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(name.split(".")[0] == "matplotlib" for name in names) and relative != "metrics/plots.py":
                offenders.append(f"jetfm/{relative}:{node.lineno}")
    assert not offenders, f"plots go through jetfm/metrics/plots.py; matplotlib imported at {offenders}"


def test_commands_talk_through_messages():
    offenders = []
    for relative in MESSAGE_FILES:
        for node in ast.walk(parsed(relative)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"jetfm/{relative}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "write" and ast.unparse(node.value) == "sys.stderr":
                offenders.append(f"jetfm/{relative}:{node.lineno} (sys.stderr.write)")
    assert not offenders, f"use jetfm.messages (info/warn/error/output) instead of print at {offenders}"


def test_the_jetclass_class_list_is_defined_once():
    from jetfm.data import convert, format, presets

    assert convert.JETCLASS_CLASSES is format.JETCLASS_CLASSES
    assert presets.PRESETS["jetclass"].classes == list(format.JETCLASS_CLASSES)
    assert presets.PRESETS["toptag"].classes == list(format.TOPTAG_CLASSES)
    copies = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if '"QCD", "Hbb"' in p.read_text()]
    assert copies == ["data/format.py"]
