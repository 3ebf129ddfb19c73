"""What jetfm says to the person at the terminal: one prefix, one stream, rank 0 only.

    from jetfm import messages
    messages.info("wrote 12 shards")              # jetfm: wrote 12 shards             (stderr)
    messages.warn("MLflow is unreachable")        # jetfm: warning: MLflow is ...      (stderr)
    messages.error("no manifest.json in data/x")  # jetfm: error: no manifest.json ... (stderr)
    messages.output(table)                        # the table as is                    (stdout)

Messages (progress, notes, warnings, errors) go to stderr; `output` is a command's result
(a summary table, the resolved config, JSON), unprefixed on stdout, so that `jetfm ... > file`
captures the result and nothing else. Streams are looked up at each call (pytest's capsys and
redirections see them).

The rank rule: in a multi-process run only rank 0 speaks, so a message appears once, not once
per process. `all_ranks=True` lets every rank speak (for what only one rank may know, e.g. its
own failure) and tags the line with the rank: `jetfm[rank 1]: error: ...`. The rank is
torch.distributed's when a process group is up, else $RANK (set by torchrun and accelerate),
else 0; torch is never imported for this, so data commands stay light.

While a tqdm progress bar is on screen the line is written through `tqdm.write`, which keeps
the bar intact. Library warnings a caller may want to filter or assert (`pytest.warns`) stay
`warnings.warn`; this module is for the command line.
"""

from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _emit(text: str, stream, all_ranks: bool, label: str = "") -> None:
    this_rank = rank()
    if this_rank != 0 and not all_ranks:
        return
    if stream is not sys.stdout:
        prefix = "jetfm" if this_rank == 0 else f"jetfm[rank {this_rank}]"
        text = f"{prefix}: {label}{text}"
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):  # a bar is on screen
        tqdm.tqdm.write(text, file=stream)
        stream.flush()
    else:
        print(text, file=stream, flush=True)


def info(text: str, *, all_ranks: bool = False) -> None:
    """`jetfm: text` on stderr: progress and notes."""
    _emit(text, sys.stderr, all_ranks)


def warn(text: str, *, all_ranks: bool = False) -> None:
    """`jetfm: warning: text` on stderr: something the user should look at; the work goes on."""
    _emit(text, sys.stderr, all_ranks, "warning: ")


def error(text: str, *, all_ranks: bool = False) -> None:
    """`jetfm: error: text` on stderr: why a command stops (the caller returns its exit code)."""
    _emit(text, sys.stderr, all_ranks, "error: ")


def output(text: str) -> None:
    """A command's result on stdout, unprefixed (rank 0 only)."""
    _emit(text, sys.stdout, False)
