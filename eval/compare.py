"""`gere-ds compare` as a script (python eval/compare.py ...): see gere_ds/commands/compare.py."""
from gere_ds.commands.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
