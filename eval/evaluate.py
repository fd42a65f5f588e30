"""`gere-ds evaluate` as a script path, for `deepspeed ... eval/evaluate.py` and older command
lines; see gere_ds.commands.evaluate for the arguments."""
from __future__ import annotations

import sys

from gere_ds.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
