"""The `gere-ds` console script: help, a clear line for an unknown or missing command, and real
commands run through it (the same module the installed `gere-ds` script calls)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_python

from gere_ds import cli


def test_help_lists_every_command():
    r = run_python(["-m", "gere_ds.cli", "--help"])
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines()[3:]]
    assert listed == list(cli.COMMANDS)


def test_unknown_command_is_one_line_naming_the_known_ones(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err
    assert all(name in err for name in cli.COMMANDS)


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: gere-ds <command>")


def test_command_whose_module_is_absent(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("gere_ds.commands.no_such_module", "absent"))
    assert cli.main(["ghost", "--x"]) == 2
    assert "command 'ghost' is not available" in capsys.readouterr().err


def test_every_listed_command_that_exists_has_main():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            assert err.name == module, f"{name}: {err}"  # not landed yet: reported, not a crash
            continue
        assert callable(mod.main), name


def test_evaluate_through_the_console_script(tiny_config, tiny_paths, tmp_path):
    """A real evaluation of the tiny model in one process, through `gere-ds evaluate`."""
    cfg = tiny_config("tm", name="cli_eval")
    out = tmp_path / "eval"
    r = run_python(["-m", "gere_ds.cli", "evaluate", "--config", str(cfg), "--model",
                    tiny_paths["model"], "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 1 and len(metrics["matrix"][0]) == 2
    assert all(0.0 <= a <= 100.0 for a in metrics["matrix"][0])
    r = run_python(["-m", "gere_ds.cli", "evaluate", "--config", str(cfg), "--model",
                    str(tmp_path / "missing"), "--out", str(out)])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_installed_script_runs_when_installed():
    """`pip install -e .` puts `gere-ds` next to the interpreter (scripts/test.sh installs it)."""
    script = Path(sys.executable).parent / "gere-ds"
    if not script.is_file():
        pytest.skip("gere-ds is not installed in this environment (pip install -e .)")
    import subprocess

    r = subprocess.run([str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and "prepare-assets" in r.stdout, r.stderr
