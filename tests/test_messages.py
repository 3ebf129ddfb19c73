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
