"""jetfm.messages: one prefix, stderr for messages, stdout for results, rank 0 only unless asked."""

from __future__ import annotations

from jetfm import cli, messages


def test_prefixes_and_streams(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    messages.info("wrote 3 shards")
    messages.warn("2 features missing")
    messages.error("no manifest.json")
    messages.output("a | table")
    captured = capsys.readouterr()
    assert captured.err == "jetfm: wrote 3 shards\njetfm: warning: 2 features missing\njetfm: error: no manifest.json\n"
    assert captured.out == "a | table\n"


def test_other_ranks_are_silent_unless_asked(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert messages.rank() == 1
    messages.info("hello")
    messages.warn("careful")
    messages.output("result")
    assert capsys.readouterr() == ("", "")
    messages.error("out of memory", all_ranks=True)
    assert capsys.readouterr().err == "jetfm[rank 1]: error: out of memory\n"


def test_a_data_command_error_goes_to_stderr_with_the_one_prefix(tmp_path, capsys):
    assert cli.main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("jetfm: error: ") and "nothing" in captured.err


SPEAKERS = """
import os, sys
import torch.distributed as dist
from jetfm import messages

rank = int(sys.argv[1])
os.environ.pop("RANK", None)  # the rank must come from the process group
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
messages.info(f"hello from {rank}")
messages.error(f"failed on {rank}", all_ranks=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_gloo_processes_print_once_unless_every_rank_is_asked(tmp_path):
    import subprocess
    import sys

    from jetfm.distributed import free_port

    script = tmp_path / "speak.py"
    script.write_text(SPEAKERS)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][1].splitlines() == ["jetfm: hello from 0", "jetfm: error: failed on 0"]
    assert outputs[1][1].splitlines() == ["jetfm[rank 1]: error: failed on 1"]
