"""benchmarks/proto_merge.py: the fixture refresh's two invocations in one record file, refused with the
reason when they cannot describe one code state on one machine (no ranks, no timing)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.proto_merge import main, merge  # noqa: E402


def _part(command, rows, commit="c1", machine="m"):
    head = {"date": "d", "commit": commit, "machine": machine, "versions": "v", "command": command}
    return {"header": head, "records": [{"size": s, "times": {r: [1.0, 2.0] for r in rows}} for s in ("5m", "50m")]}


def test_merge_keeps_each_invocation_whole_and_tagged():
    a, b = _part("p --rows ddp zero1", ["ddp", "zero1"]), _part("p --rows ddp fsdp2 --merge", ["ddp", "fsdp2"])
    m = merge(a, b)
    assert [r["part"] for r in m["records"]] == [0, 0, 1, 1]
    assert [list(r["times"]) for r in m["records"]] == [["ddp", "zero1"]] * 2 + [["ddp", "fsdp2"]] * 2
    assert [h["command"] for h in m["header"]["parts"]] == [a["header"]["command"], b["header"]["command"]]
    assert m["header"]["commit"] == "c1" and "part" not in a["records"][0]        # inputs untouched
    c = _part("p --rows ddp local --merge", ["ddp", "local"])
    assert [r["part"] for r in merge(m, c)["records"]] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("new, why", [
    (_part("p --rows ddp fsdp2 --merge", ["ddp"], commit="c2"), "differ in commit"),
    (_part("p --rows ddp fsdp2 --merge", ["ddp"], machine="other"), "differ in machine"),
    (_part("p --rows ddp zero1", ["ddp"]), "already in the file"),
    (_part("p --rows fsdp2 --merge", ["fsdp2"]), "share no row"),
])
def test_merge_refuses_with_the_reason(new, why):
    with pytest.raises(ValueError, match=why):
        merge(_part("p --rows ddp zero1", ["ddp", "zero1"]), new)


def test_merge_command_line(tmp_path, capsys):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    a.write_text(json.dumps(_part("p1", ["ddp", "zero1"])))
    b.write_text(json.dumps(_part("p2", ["ddp", "fsdp2"])))
    assert main([str(a), str(b), "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["records"]) == 4 and "4 records from 2" in capsys.readouterr().out


def test_protocol_refuses_a_merge_before_running(tmp_path, capsys):
    from benchmarks.protocol import main as protocol
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit):
        protocol(["--sizes", "tiny", "--rows", "ddp", "--json", str(missing), "--merge"])
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_part("p1", ["ddp"], commit="not-this-one")))
    with pytest.raises(SystemExit):
        protocol(["--sizes", "tiny", "--rows", "ddp", "--json", str(other), "--merge"])
    assert "differ in commit" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("")
    with pytest.raises(SystemExit):
        protocol(["--sizes", "tiny", "--rows", "ddp", "--json", str(bad), "--merge"])
    assert "cannot be read" in capsys.readouterr().err
