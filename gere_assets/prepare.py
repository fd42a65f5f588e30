"""Run the preparation steps idempotently: skip what the manifest proves is intact,
rebuild what is missing, changed or corrupted, and say which with one line per step."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from gere_assets.files import remove_stale_temps
from gere_assets.manifest import Manifest
from gere_assets.settings import Settings
from gere_assets.sources import SourceLocator
from gere_assets.steps import DEFAULT_STEPS, STEPS
from gere_ds.errors import InputError

Log = Callable[[str], None]
STEP_ORDER: tuple[str, ...] = tuple(STEPS)  # model, tasks, general, mmlu, suite, bench, bigbench


@dataclass
class PrepareReport:
    changed: list[str] = field(default_factory=list)      # steps (re)built by this run
    up_to_date: list[str] = field(default_factory=list)   # steps verified and left alone
    seconds: dict[str, float] = field(default_factory=dict)


def check_steps(steps: Iterable[str]) -> tuple[str, ...]:
    """Requested step names in canonical order; unknown names are an InputError."""
    wanted = list(steps)
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        raise InputError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEP_ORDER)}",
                         field="steps")
    return tuple(s for s in STEP_ORDER if s in wanted)


def prepare(out: Path, settings: Settings | None = None, steps: Iterable[str] = DEFAULT_STEPS,
            locator: SourceLocator | None = None, log: Log = print,
            force: bool = False) -> PrepareReport:
    """Build the assets under ``out``; returns which steps changed."""
    settings = settings or Settings()
    settings.validate()
    chosen = check_steps(steps)
    locator = locator or SourceLocator(log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out):  # leftovers of a crashed run; never trusted
        log(f"removed unfinished {stale.relative_to(out).as_posix()} of an earlier run")
    manifest = Manifest(out)
    if manifest.unreadable:
        log(f"manifest {manifest.path} is unreadable; rebuilding every requested step")
    report = PrepareReport()
    reasons = {name: "forced" if force else manifest.stale_reason(name, STEPS[name].settings(settings, out))
               for name in chosen}
    # every source the steps to build need is found and verified before any of them starts
    fetch_sources([name for name in chosen if reasons[name] is not None], settings, locator)
    for number, name in enumerate(chosen, start=1):
        step = STEPS[name]
        prefix = f"[{number}/{len(chosen)}] {name}:"
        start = time.monotonic()
        step_settings = step.settings(settings, out)
        reason = reasons[name]
        if reason is None:
            report.up_to_date.append(name)
            report.seconds[name] = round(time.monotonic() - start, 2)
            log(f"{prefix} up to date ({report.seconds[name]:.1f}s)")
            continue
        if reason != "not built yet":
            log(f"{prefix} rebuilding ({reason})")
        result = step.build(out, settings, locator)
        _remove_orphans(out, manifest, name, set(result.files))
        seconds = round(time.monotonic() - start, 2)
        manifest.set_step(name, {
            "settings": step_settings,
            "files": {rel: rec.as_dict() for rel, rec in sorted(result.files.items())},
            "counts": result.counts,
            **result.info,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
        })
        report.changed.append(name)
        report.seconds[name] = seconds
        log(f"{prefix} built {result.summary} ({seconds:.1f}s)")
    return report


def fetch_sources(steps: Iterable[str], settings: Settings, locator: SourceLocator) -> list[str]:
    """Find (downloading when allowed) and verify every package the given steps read; an
    unavailable or changed one is an InputError before anything is built. Returns their keys."""
    chosen = check_steps(steps)
    keys = list(dict.fromkeys(key for name in chosen for key in STEPS[name].sources))
    locator.check(keys)
    if "bigbench" in chosen:
        if not settings.bigbench:
            raise InputError("the bigbench step needs --bigbench PATH (BIG-bench 1.0.0's sdist or "
                             "a folder holding it)", field="bigbench")
        locator.bigbench_sdist(Path(settings.bigbench))
        keys.append("bigbench")
    return keys


def _remove_orphans(out: Path, manifest: Manifest, name: str, keep: set[str]) -> None:
    """Delete files an earlier build of this step made that the new build did not
    (e.g. the folder of a task dropped from the sequence), so stale data is not picked up."""
    for rel in (manifest.step(name) or {}).get("files", {}):
        if rel not in keep:
            path = out / rel
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # only if now empty
            except OSError:
                pass
