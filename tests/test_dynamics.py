"""eval/dynamics.py on hand-written step logs: the numbers in the table are the logs' numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval",
                      "dynamics.py")


def _run_dir(root, name, strategy, steps):
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"replay": {"strategy": strategy}}))
    (d / "train_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return str(d)


def _tm_steps(viol, weight_scale=1.0):
    return [{"global_step": i + 1, "train/task_ce": 2.0 + i, "train/replay_ce": 3.0 - i,
             "train/tm": v / 10, "train/tm_violation_frac": v,
             "train/tm_weight": (4e8 if v == 0 else 100.0 * weight_scale * (i + 1))}
            for i, v in enumerate(viol)]


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120)


def test_table_means_seeds_and_hides_replay_ce_without_replay(tmp_path):
    a = _run_dir(tmp_path, "tm_s1", "tm", _tm_steps([0.0, 0.01, 0.03]))
    b = _run_dir(tmp_path, "tm_s2", "tm", _tm_steps([0.0, 0.03, 0.05], weight_scale=3.0))
    none = _run_dir(tmp_path, "none", "none",
                    [{"global_step": 1, "train/task_ce": 1.5, "train/replay_ce": 0.0}])
    out = tmp_path / "dyn"
    p = _run(a, b, none, "--names", "tm,tm,none", "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = {ln.split(" | ")[0].lstrip("| "): ln.strip("| \n").split(" | ")
            for ln in p.stdout.splitlines()[2:]}
    tm = rows["tm"]
    assert tm[1] == "2"
    assert tm[2] == "3.000 ± 0.000"            # task CE: mean of 2, 3, 4 in both seeds
    assert tm[4] == "1.000 ± 0.000"            # replay CE at the last step
    assert tm[6] == "500.0 ± 250.0"            # median weight without the TM = 0 step's 4e8:
    #                                            median(200, 300) = 250, median(600, 900) = 750
    assert tm[7] == "2.00 ± 1.00"              # violating % at step 2: 1 and 3
    assert tm[9] == "4.00 ± 1.00"              # violating % at the last step: 3 and 5
    assert rows["none"][2] == "1.500" and rows["none"][3] == "-" and rows["none"][7] == "-"
    assert (out / "dynamics.md").read_text() == p.stdout
    assert (out / "dynamics.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_log_names_file_and_line(tmp_path):
    d = _run_dir(tmp_path, "r", "tm", _tm_steps([0.0, 0.1]))
    with open(os.path.join(d, "train_steps.jsonl"), "a") as fh:
        fh.write("{broken\n")
    p = _run(d, "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == (f"dynamics: {d}/train_steps.jsonl:3: invalid JSON "
                                "(Expecting property name enclosed in double quotes)")
    assert not (tmp_path / "o" / "dynamics.md").exists()
    p = _run(str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "train_steps.jsonl: not found" in p.stderr
