"""The pre-flight check: launch-argument checks (fast, no launcher), the report logic, and real
runs under the deepspeed launcher (slow): healthy, output not writable on one node, data file
missing, a peer that never joins, a master address that does not resolve."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_scripts.launchers import (
    DEEPSPEED,
    REPO,
    clean_shm,
    ds_env,
    free_port,
    our_lines,
    run_nodes,
    run_one,
    write_hostfile,
)

from gere_ds.commands.preflight import report
from gere_ds.errors import InputError
from gere_ds.runtime import launch_checks, preflight

PREFLIGHT = REPO / "launch" / "preflight.py"


def _preflight(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gere_ds.cli", "preflight", *args], cwd=REPO,
                       env=ds_env(), capture_output=True, text=True, timeout=timeout,
                       check=False)
    return r, time.monotonic() - t0


def _fail_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("preflight: FAIL ")]


# ----------------------------------------------------------------------------- launch arguments


def test_hostfile_ok(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nlocalhost slots=2\n\n127.0.0.1 slots=2  # second\n")
    assert launch_checks.parse_hostfile(str(hf)) == [("localhost", 2), ("127.0.0.1", 2)]
    r, _ = _preflight("--hostfile", str(hf), "--num_nodes", "2", "--node_rank", "1",
                      "--master_addr", "127.0.0.1", "--master_port", "29500")
    assert r.returncode == 0, r.stderr
    assert "launch arguments ok" in r.stdout


@pytest.mark.parametrize("text, expect", [
    ("localhost slots=2\nnode2 slot=8\n", "hostfile:2: bad entry 'node2 slot=8'"),
    ("localhost\n", "hostfile:1: bad entry 'localhost'"),
    ("localhost slots=2\nlocalhost slots=2\n", "hostfile:2: host 'localhost' listed twice"),
    ("localhost slots=0\n", "hostfile:1: host 'localhost' has slots=0"),
    ("# nothing\n", "hostfile: no hosts listed"),
])
def test_malformed_hostfile_one_line(tmp_path, text, expect):
    hf = tmp_path / "hostfile"
    hf.write_text(text)
    r, _ = _preflight("--hostfile", str(hf))
    assert r.returncode == 2
    lines = _fail_lines(r.stderr)
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(InputError):
        launch_checks.parse_hostfile(str(hf))


def test_node_rank_outside_node_count(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    r, _ = _preflight("--hostfile", str(hf), "--num_nodes", "2", "--node_rank", "2")
    assert r.returncode == 2
    assert _fail_lines(r.stderr) == [
        "preflight: FAIL launch: --node_rank 2 is outside 0..1 (2 node(s))"]
    r, _ = _preflight("--hostfile", str(hf), "--num_nodes", "3", "--node_rank", "0")
    assert r.returncode == 2 and "lists only 2 host(s)" in r.stderr
    r, _ = _preflight("--num_nodes", "2", "--node_rank", "0")
    assert r.returncode == 2 and "needs a hostfile" in r.stderr


def test_module_spelling_and_launch_script_run_the_same_command():
    """`python -m gere_ds.commands.preflight` and launch/preflight.py stay equal to `gere-ds preflight`."""
    for argv in (["-m", "gere_ds.commands.preflight"], [str(PREFLIGHT)]):
        r = subprocess.run([sys.executable, *argv, "--num_nodes", "2", "--node_rank", "0"],
                           cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 2 and "needs a hostfile" in r.stderr, r.stderr


def test_master_addr_that_does_not_resolve_fails_in_bounded_time(tmp_path):
    r, seconds = _preflight("--master_addr", "no-such-host.invalid", "--timeout", "5")
    assert r.returncode == 2
    lines = _fail_lines(r.stderr)
    assert len(lines) == 1 and "--master_addr 'no-such-host.invalid'" in lines[0], r.stderr
    assert seconds < 5 + 10


def test_unresolvable_host_in_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=1\nno-such-node.invalid slots=1\n")
    r, _ = _preflight("--hostfile", str(hf), "--timeout", "5")
    assert r.returncode == 2
    assert "host 'no-such-node.invalid' does not resolve" in r.stderr


def test_resolve_is_bounded_even_when_lookup_hangs(monkeypatch):
    def hang(*a, **k):
        time.sleep(30)

    monkeypatch.setattr(launch_checks.socket, "getaddrinfo", hang)
    t0 = time.monotonic()
    answers = launch_checks.resolve_hosts(["a", "b"], timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert all("no answer within 0.5 s" in v for v in answers.values())


# ----------------------------------------------------------------------------- report logic


def _row(rank, node=0, host="h", local=None, **info):
    r = preflight.Row(host=host, node=node, rank=rank, local_rank=rank if local is None else local,
                      world_size=2, info=info)
    for c in preflight.CHECKS:
        r.set(c, True)
    return r


def test_cross_checks_name_the_node_and_check():
    v = {"python": "3.11", "torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0"}
    rows = [_row(0, versions=v, config={"model": "/m", "output_dir": "/a"},
                 model_files={"model.safetensors": 100}),
            _row(1, node=1, host="h2", local=0, versions={**v, "torch": "2.12.0"},
                 config={"model": "/m", "output_dir": "/b"},  # node-local key: allowed
                 model_files={"model.safetensors": 90})]
    preflight.cross_checks(rows)
    assert rows[0].failures() == []
    fails = dict(rows[1].failures())
    assert set(fails) == {"versions", "model"}
    assert "torch: 2.12.0 vs 2.13.0 on rank 0" in fails["versions"]
    assert "model.safetensors: 90 vs 100" in fails["model"]
    text = report(rows, {}, "header", [])
    assert "preflight: FAIL host h2 (node 1, rank 1): versions:" in text
    assert text.splitlines()[-1] == "preflight: FAILED: 2 check(s) on 1 of 2 rank(s)"


def test_cross_checks_duplicate_seats_and_config_difference():
    rows = [_row(0, config={"model": "/m"}), _row(1, local=0, config={"model": "/other"})]
    preflight.cross_checks(rows)
    fails = dict(rows[1].failures())
    assert "also taken by rank 0" in fails["ranks"]
    assert "model: /other vs /m on rank 0" in fails["config"]


# ----------------------------------------------------------------------------- one process


def test_single_process_files_only(tiny_config):
    cfg = tiny_config("tm", name="single")
    r, _ = _preflight("--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "preflight: all checks passed on 1 rank(s)" in r.stdout
    r, _ = _preflight("--config", str(cfg), "tasks.1.train=/nonexistent/train.jsonl")
    assert r.returncode == 1
    assert _fail_lines(r.stdout) == [
        (f"preflight: FAIL host {socket.gethostname()} (node 0, rank 0): data: "
         "/nonexistent/train.jsonl: topic train file not found")]


# ----------------------------------------------------------------------------- under the launcher


@pytest.mark.slow
def test_healthy_two_ranks(tiny_config):
    cfg = tiny_config("tm", name="healthy")
    r = run_one(PREFLIGHT, ["--config", str(cfg), "--timeout", "60"], nproc=2, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    lines = our_lines(r.output)
    assert lines[-1] == "preflight: all checks passed on 2 rank(s)"
    table = r.output[r.output.index("host  "):]
    rows = [ln.split() for ln in table.splitlines()[2:4]]
    assert [row[2] for row in rows] == ["0", "1"]  # a row per rank
    assert all(row[4:13] == ["ok"] * 9 for row in rows), table
    assert not Path(cfg.parent / "run_healthy").exists()  # the check leaves nothing behind


@pytest.mark.slow
def test_output_dir_not_writable_on_one_node(tiny_config, tmp_path):
    """Node 1's output_dir is a file: both launchers fail, naming node 1 and the check."""
    cfg = tiny_config("tm", name="outdir")
    not_a_dir = tmp_path / "plain_file"
    not_a_dir.write_text("x")
    nodes = run_nodes(PREFLIGHT, [["--config", str(cfg), "--timeout", "60"],
                                  ["--config", str(cfg), f"output_dir={not_a_dir}",
                                   "--timeout", "60"]], tmp_path, timeout=300)
    assert [n.returncode for n in nodes] == [1, 1], nodes[0].output[-3000:]
    want = (f"preflight: FAIL host {socket.gethostname()} (node 1, rank 1): output: "
            f"{not_a_dir}: output_dir: exists and is not a directory")
    assert _fail_lines(nodes[0].output) == [want]  # rank 0's report
    assert _fail_lines(nodes[1].output) == [want]  # node 1's own log says it too
    assert our_lines(nodes[0].output)[-1] == "preflight: FAILED: 1 check(s) on 1 of 2 rank(s)"


@pytest.mark.slow
def test_missing_data_file(tiny_config, tmp_path):
    cfg = tiny_config("tm", name="nodata")
    missing = tmp_path / "gone" / "train.jsonl"
    r = run_one(PREFLIGHT, ["--config", str(cfg), f"tasks.0.train={missing}"], nproc=2,
                timeout=300)
    assert r.returncode == 1, r.output[-3000:]
    fails = _fail_lines(r.output)
    assert len(fails) == 2  # both ranks, one line each
    for rank, line in enumerate(fails):
        assert f"(node 0, rank {rank}): data: {missing}: sentiment train file not found" in line


@pytest.mark.slow
def test_missing_peer_fails_within_timeout(tiny_config, tmp_path):
    """Only node 0 of 2 starts: one line after --timeout, never a hang."""
    cfg = tiny_config("tm", name="peer")
    t0 = time.monotonic()
    port = free_port()
    hf = write_hostfile(tmp_path / "hostfile", 2)
    cmd = [DEEPSPEED, "--hostfile", str(hf), "--no_ssh", "--num_nodes", "2", "--num_gpus", "1",
           "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(PREFLIGHT), "--config", str(cfg), "--timeout", "10"]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True,
                           timeout=240, check=False)
    finally:
        clean_shm(port)
    seconds = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-3000:]
    fails = _fail_lines(out)
    assert len(fails) == 1, out[-3000:]
    assert "(node 0, rank 0): process group: not all 2 ranks joined at 127.0.0.1:" in fails[0]
    assert seconds < 120


@pytest.mark.slow
def test_master_addr_unresolvable_under_launcher(tiny_config, tmp_path):
    cfg = tiny_config("tm", name="master")
    t0 = time.monotonic()
    nodes = run_nodes(PREFLIGHT, [["--config", str(cfg), "--timeout", "10"]], tmp_path,
                      gpus_per_node=2, master_addr="no-such-host.invalid", timeout=240)
    assert nodes[0].returncode == 2, nodes[0].output[-3000:]
    fails = _fail_lines(nodes[0].output)
    assert len(fails) == 1  # once per node, not once per rank
    assert "master_addr: 'no-such-host.invalid' does not resolve" in fails[0]
    assert time.monotonic() - t0 < 120
