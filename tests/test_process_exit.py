"""How a launched process ends: flushed output and logs, the exit code it chose, and no
interpreter teardown (whose process-group hooks occasionally abort a finished job with -6)."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from conftest import REPO

# what `deepspeed` launches: every rank runs these to the end of their __main__ block
LAUNCHED = [REPO / "launch/train.py", REPO / "launch/preflight.py",
            *sorted((REPO / "tests/dist_scripts").glob("*.py"))]


def test_exit_process_flushes_and_keeps_the_code_but_runs_no_teardown(tmp_path):
    log, hook = tmp_path / "run.log", tmp_path / "teardown_ran"
    script = textwrap.dedent(f"""
        import atexit, logging, pathlib
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
        logging.getLogger("gere_ds").info("last line of the log")
        atexit.register(lambda: pathlib.Path({str(hook)!r}).write_text("ran"))
        print("unterminated", end="")
        from gere_ds.runtime import dist
        dist.exit_process(3)
        print("never")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unterminated"
    assert "last line of the log" in log.read_text()
    assert not hook.exists()  # the at-exit hooks were skipped


def _main_block_calls(path) -> list[str]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return [ast.unparse(call.func) for stmt in node.body for call in ast.walk(stmt)
                    if isinstance(call, ast.Call)]
    return []


def test_every_launched_script_ends_through_exit_process():
    scripts = [p for p in LAUNCHED if _main_block_calls(p)]
    assert len(scripts) >= 10, scripts  # the entry points and the test scripts with a main
    missing = [p.relative_to(REPO).as_posix() for p in scripts
               if "dist.exit_process" not in _main_block_calls(p)]
    assert missing == []
