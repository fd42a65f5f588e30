"""`gere-ds dynamics` as a script (python eval/dynamics.py ...): see gere_ds/commands/dynamics.py."""
from gere_ds.commands.dynamics import main

if __name__ == "__main__":
    raise SystemExit(main())
