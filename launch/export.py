"""`python launch/export.py ...` = `gere-ds export ...` (gere_ds.commands.export)."""
from __future__ import annotations

import sys

from gere_ds.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
