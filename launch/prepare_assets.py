#!/usr/bin/env python
"""`gere-ds prepare-assets` as a script path; the default --out is assets/ in this repository.

    python launch/prepare_assets.py                      # everything into assets/
    python launch/prepare_assets.py --skip-model         # data only

See gere_assets.cli for every argument and docs/data.md for what is built.
"""
from __future__ import annotations

import sys
from pathlib import Path

from gere_assets.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=Path(__file__).resolve().parents[1] / "assets"))
