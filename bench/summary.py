"""Print the headline numbers of the latest benchmark results as Markdown (for
docs/performance.md) and check them against the speed targets.

    python bench/summary.py [--results bench/results] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path


def load(results: Path, name: str, smoke: bool) -> dict | None:
    path = results / f"{name}{'-smoke' if smoke else ''}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt_ratio(r: dict) -> str:
    return f"{r['median_of_ratios']:.3f} (rounds {r['min']:.2f}-{r['max']:.2f}, n={r['rounds']})"


def targets(strat: dict | None, hf: dict | None) -> list[list[str]]:
    rows = []
    if strat:
        r = strat["summary"]["variants"]["tm"]["vs_replay"]
        rows.append(["TM step <= 1.05 x plain-replay step", fmt_ratio(r),
                     "met" if r["median_of_ratios"] <= 1.05 else "NOT met"])
    if hf:
        ratios = hf["summary"]["ratios"]
        r = ratios.get("gere_none/hf_plain")
        if r:
            rows.append(["gere-ds none at least as fast as the HF Trainer (time ratio <= 1)",
                         fmt_ratio(r), "met" if r["median_of_ratios"] <= 1.0 else "NOT met"])
        r = ratios.get("gere_tm/hf_ref")
        if r:
            rows.append(["gere-ds GeRe (tm) >= 1.2x faster than reference-style GeRe (time ratio "
                         "<= 0.833)", f"{fmt_ratio(r)} = {1 / r['median_of_ratios']:.2f}x faster",
                         "met" if r["median_of_ratios"] <= 1 / 1.2 else "NOT met"])
        solo = hf["summary"].get("solo") or {}
        if solo.get("hf_plain") and solo.get("gere_none") and solo.get("gere_tm"):
            base = max(solo["hf_plain"]["max_rss_mib_per_rank"])
            for name in ("gere_none", "gere_tm"):
                mine = max(solo[name]["max_rss_mib_per_rank"])
                rows.append([f"peak RSS per rank of {name} <= HF Trainer (hf_plain)",
                             f"{mine:.0f} MiB vs {base:.0f} MiB",
                             "met" if mine <= base else "NOT met"])
            if solo.get("hf_ref"):
                ref = max(solo["hf_ref"]["max_rss_mib_per_rank"])
                mine = max(solo["gere_tm"]["max_rss_mib_per_rank"])
                rows.append(["peak RSS per rank of gere_tm <= reference-style GeRe",
                             f"{mine:.0f} MiB vs {ref:.0f} MiB",
                             "met" if mine <= ref else "NOT met"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(common.RESULTS))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    strat = load(results, "bench_strategies", args.smoke)
    hf = load(results, "bench_vs_hf_trainer", args.smoke)
    if not strat and not hf:
        print(f"no results in {results}", file=sys.stderr)
        return 1
    for d in (strat, hf):
        if d:
            m = d["machine"]
            print(f"- {d['benchmark']}: {m['cpu_model']}, {m['usable_cpus']} CPUs, torch "
                  f"{m['torch']}, deepspeed {m['deepspeed']}, transformers {m['transformers']}, "
                  f"load average {m['load_average'][0]:.1f} -> "
                  f"{m.get('load_average_end', [float('nan')])[0]:.1f}, {d['reps']} rounds, "
                  f"wall {d['wall_s']:.0f} s")
    print()
    print(common.table(["target", "measured", "verdict"], targets(strat, hf)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
