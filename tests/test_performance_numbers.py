"""The numbers docs/performance.md quotes from the committed bench results, checked against
those files (results/bench_packing.json, results/bench_generate.json,
results/peer_levers/bench_peer.json)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "performance.md"


def _section(title: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def test_the_packing_section_quotes_its_results_file():
    data = json.loads((REPO / "results/bench_packing.json").read_text())
    page = _section("Training micro-batches")
    table = PAGE.read_text(encoding="utf-8")  # the levers table quotes the same run
    for layout in ("padded", "packed"):
        row = (f"| {layout} | {data['token_slots'][layout]:,} | "
               f"{_pct(data['padding_fraction'][layout])} | "
               f"{data['seconds_per_micro_batch'][layout]:.3f} | "
               f"{data['real_tokens_per_cpu_s'][layout]:.1f} | {_pct(data['mfu'][layout])} |")
        assert row in page, row
    speed = data["speedup_padded_over_packed"]
    lever = (f"padding {_pct(data['padding_fraction']['padded'])} -> 0 %, "
             f"{speed['median']:.2f}x less CPU time per micro-batch (rounds "
             f"{speed['min']:.2f}-{speed['max']:.2f})")
    assert lever in table, lever
    assert f"{speed['median']:.2f}x on the benchmark's rows" in table
    assert f"the {data['micro_batches']} micro-batches of the first {data['steps_per_task']} " \
           f"steps" in page
    assert f"over {data['rounds']} rounds" in page
    assert f"{data['body_parameters'] / 1e6:.1f}M body parameters" in page
    assert f"head's {data['head_parameters'] / 1e6:.1f}M" in page
    assert f"{data['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s" in page
    assert f"(by up to {data['max_loss_difference']:.2f} here)" in page
    shares = data["profile_share"]["packed"]
    for part, words in (("matmul", "matrix products"), ("attention", "attention"),
                        ("elementwise", "elementwise work"), ("other", "the rest")):
        assert f"{words}" in page and f"{100 * shares[part]:.0f} %" in page, part
    padded = data["profile_share"]["padded"]
    # "padded within a point"
    assert all(abs(round(100 * padded[k]) - round(100 * shares[k])) <= 1
               for k in ("matmul", "attention", "elementwise")), padded


def test_the_generate_section_quotes_its_results_file():
    data = json.loads((REPO / "results/bench_generate.json").read_text())
    page = " ".join(_section("Evaluation (`bench/bench_eval.py`)").split())
    cpu, speed = data["cpu_seconds_per_prompt"], data["speedup_whole_over_kv"]
    assert (f"{data['prompts']} of the benchmark's test prompts ({data['prompts'] // 3} per "
            f"task), {data['max_new_tokens']} new tokens at most, batches of "
            f"{data['batch_size']}") in page
    assert data["dtype"] == "torch.bfloat16" and f"{data['rounds']} rounds" in page
    assert (f"{cpu['kv_cache']:.3f} CPU s per prompt from the KV cache against "
            f"{cpu['whole_sequence']:.3f} for the whole-sequence loop, **{speed['median']:.2f}x** "
            f"(rounds {speed['min']:.2f}-{speed['max']:.2f}), {data['new_tokens']} new tokens"
            ) in page
    assert (f"{data['continuations_differing']} of the {data['prompts']} continuations differ"
            in page)


def test_the_chunked_head_section_quotes_its_results_file():
    data = json.loads((REPO / "results/bench_linear_ce.json").read_text())
    page = " ".join(_section("The LM head without its logits").split())
    assert (f"A Llama-3 vocabulary ({data['vocab']:,}) on SmolLM2's hidden size "
            f"({data['hidden']}), bf16, {data['positions']:,} positions") in page
    assert f"{data['reps']} interleaved repetitions" in page
    rss, cpu = data["peak_rss_mib"], data["cpu_seconds"]
    assert (f"takes {rss['chunked']:,} MiB at its peak above the start against "
            f"{rss['plain']:,} for the plain one (the bf16 logits alone are "
            f"{data['logits_mib']:,} MiB)") in page
    assert f"and {cpu['chunked']:.2f} CPU s against {cpu['plain']:.2f}" in page


def test_the_peer_levers_table_quotes_its_results_file():
    data = json.loads((REPO / "results/peer_levers/bench_peer.json").read_text())
    page = _section("Against the GeRe authors' own trainer")
    assert data["work"]["rounds"] == 1 and "| implementation (round 1) |" in page
    runs = {r["impl"]: r for r in data["runs"]}
    ref = runs["reference"]
    assert (f"| the authors' trainer, ZeRO-2 | {ref['tok_s']:.1f} | {ref['step_s_median']:.2f} | "
            f"{ref['teacher_s']:.0f} | {ref['peak_rss_gib']:.2f} | 1, 1, 1 |") in page
    names = {"zero2": "gere-ds ZeRO-2 as shipped (`zero2`)",
             "zero2_levers": "gere-ds ZeRO-2, split by memory and packed (`zero2_levers`)",
             "zero3": "gere-ds ZeRO-3 as shipped (`zero3`)",
             "zero3_levers": "gere-ds ZeRO-3, split by memory and packed (`zero3_levers`)"}
    for variant, label in names.items():
        r = runs[f"gere-ds {variant}"]
        q = r["ratio_to_reference"]
        bold = variant.endswith("levers")
        tok = f"**{q['tok_s']:.2f}**" if bold else f"{q['tok_s']:.2f}"
        rss = f"**{q['peak_rss']:.2f}**" if bold else f"{q['peak_rss']:.2f}"
        row = (f"| {label} | {r['tok_s']:.1f} | {r['step_s_median']:.2f} | {r['teacher_s']:.0f} | "
               f"{r['peak_rss_gib']:.2f} | {tok}, {q['teacher_s']:.2f}, {rss} |")
        assert row in page, row
    gain = {s: runs[f"gere-ds {s}_levers"]["tok_s"] / runs[f"gere-ds {s}"]["tok_s"]
            for s in ("zero2", "zero3")}
    assert (f"ZeRO-2 {gain['zero2']:.2f}x and ZeRO-3 {gain['zero3']:.2f}x its shipped tok/s"
            in " ".join(page.split()))
    ratio = {s: runs[f"gere-ds {s}"]["ratio_to_reference"] for s in names}
    flat = " ".join(page.split())
    assert f"**{ratio['zero3_levers']['tok_s']:.2f}x** with the split by memory" in flat
    assert f"**{ratio['zero2_levers']['tok_s']:.2f}x** with the split by memory" in flat
    short = 1.5 - round(ratio["zero2_levers"]["tok_s"], 2)
    assert f"{short:.2f}x short" in flat and ratio["zero3_levers"]["tok_s"] >= 1.0
    assert (f"**{ratio['zero2_levers']['peak_rss']:.2f}x** and "
            f"**{ratio['zero3_levers']['peak_rss']:.2f}x**") in flat
    assert ratio["zero3_levers"]["peak_rss"] <= 1.0 and ratio["zero2_levers"]["peak_rss"] <= 1.0
    assert f"{ratio['zero3']['tok_s']:.2f}x as shipped in that round" in flat
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert (f"ZeRO-2 reaches {ratio['zero2_levers']['tok_s']:.2f}x at "
            f"{ratio['zero2_levers']['peak_rss']:.2f}x its peak memory and ZeRO-3 "
            f"{ratio['zero3_levers']['tok_s']:.2f}x at {ratio['zero3_levers']['peak_rss']:.2f}x "
            f"(one round") in readme
