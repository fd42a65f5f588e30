"""`gere-ds <command> [args ...]`: one console script for every command.

Each command is a module with ``main(argv: list[str] | None) -> int``, imported only when it is
run, so `gere-ds --help` and a light command never pull in torch or DeepSpeed.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gere_ds.commands.train", "train a task sequence (under the deepspeed launcher)"),
    "evaluate": ("gere_ds.commands.evaluate", "score model folders or a finished run's checkpoints"),
    "export": ("gere_ds.commands.export", "write a checkpoint as a Hugging Face folder"),
    "preflight": ("gere_ds.commands.preflight", "check hosts, ranks, collectives and input files"),
    "lm-eval": ("gere_ds.commands.lm_eval", "score exports with lm-evaluation-harness on local "
                "task files"),
    "compare": ("gere_ds.commands.compare", "put finished runs side by side"),
    "dynamics": ("gere_ds.commands.dynamics", "plot replay terms over training"),
    "states": ("gere_ds.commands.states", "which activation states a model flipped from the base's"),
    "prepare-assets": ("gere_assets.cli", "build the demo's model and data offline"),
}
PROG = "gere-ds"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [args ...]   ({PROG} <command> --help for its arguments)",
             "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{PROG}: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:  # a missing dependency of the command: its own traceback
            raise
        print(f"{PROG}: command {name!r} is not available in this installation "
              f"({module_name} is missing)", file=sys.stderr)
        return 2
    sys.argv[0] = f"{PROG} {name}"  # argparse names the command in usage lines
    code = int(module.main(rest) or 0)
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        # lazy: dist loads torch, which only such a command has loaded
        from gere_ds.runtime import dist

        dist.exit_process(code)  # every command ends on a barrier
    return code


if __name__ == "__main__":
    sys.exit(main())
