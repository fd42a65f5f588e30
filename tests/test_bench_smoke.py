"""The benchmarks run end to end in --smoke mode (tiny model, one short round) so they cannot
rot: each launches `deepspeed --num_gpus 2` itself, prints its table and writes its JSON with the
machine, the versions and the ratios against the baseline measured in the same run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, ds_env


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root / "results", root / "assets"


def _run(script: str, out: Path, assets: Path) -> dict:
    proc = subprocess.run([sys.executable, f"bench/{script}.py", "--smoke", "--out", str(out),
                           "--assets", str(assets)], cwd=REPO, env=ds_env(),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    path = out / f"{script}-smoke.json"
    assert path.is_file() and str(path) in proc.stdout
    data = json.loads(path.read_text())
    machine = data["machine"]
    for key in ("cpu_model", "usable_cpus", "torch", "deepspeed", "transformers"):
        assert machine.get(key), key
    assert data["smoke"] is True and data["world_size"] == 2
    return data | {"stdout": proc.stdout}


def _run_one_process(script: str, out: Path) -> dict:
    """A one-process benchmark (no launcher) in smoke mode; its JSON."""
    proc = subprocess.run([sys.executable, f"bench/{script}.py", "--smoke", "--out", str(out)],
                          cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads((out / f"{script}-smoke.json").read_text())


def test_bench_ce_smoke(bench_dirs):
    """One process, no launcher: the CE term variants agree in value and gradient."""
    data = _run_one_process("bench_ce", bench_dirs[0])
    for name, r in data["results"].items():
        assert r["value_rel_diff"] < 1e-4 and r["grad_max_abs_diff"] < 1e-3, name
        assert r["ms"]["median"] > 0


@pytest.mark.slow
def test_bench_strategies_smoke(bench_dirs):
    data = _run("bench_strategies", *bench_dirs)
    v = data["summary"]["variants"]
    assert not data["raw"]["notes"], data["raw"]["notes"]  # no strategy was skipped
    for s in ("none", "replay", "tm", "kl", "l2"):
        assert s in v, (s, data["raw"]["notes"])
        assert v[s]["tokens_per_s"] > 0 and math.isfinite(v[s]["step_s"]["median"])
        assert all(x > 0 for x in v[s]["rss_peak_mib_per_rank"])
    assert math.isfinite(v["tm"]["vs_replay"]["median_of_ratios"])
    # the trainer's path (LM head on supervised positions) changes no number
    assert set(data["raw"]["path_checks"]) == {"none", "replay", "tm", "l2"}
    for s, check in data["raw"]["path_checks"].items():
        assert check["rel_diff"] < 1e-3, (s, check)
    c = data["summary"]["teacher_vs_epoch"]
    assert c["teacher_pass_s"]["median"] > 0 and c["epoch_s"]["median"] > 0
    assert c["epoch_steps"] > 0
    b = data["summary"]["teacher_bytes"]
    hidden = data["model"]["hidden"]
    assert b["bench"]["measured_manifest"]["tm"] == pytest.approx(hidden / 4, rel=0.05)
    assert b["llama_3_1_8b"]["per_token"]["tm (2-bit states)"] == 1024
    assert "(d) teacher bytes per replay token" in data["stdout"]


@pytest.mark.slow
def test_bench_vs_hf_trainer_smoke(bench_dirs):
    data = _run("bench_vs_hf_trainer", *bench_dirs)
    s = data["summary"]
    for name in ("hf_plain", "gere_none", "hf_ref", "gere_tm"):
        assert s["variants"][name]["tokens_per_s"] > 0, name
    for key in ("gere_none/hf_plain", "gere_tm/hf_ref"):
        assert math.isfinite(s["ratios"][key]["median_of_ratios"]), key
    # the baseline really is a ZeRO-3 DeepSpeed engine over both ranks, bf16
    note = next(n for n in s["notes"] if n.startswith("HF Trainer engine"))
    assert "'zero_stage': 3" in note and "'world_size': 2" in note and "'bf16': True" in note
    # both sides start from the same weights: their first CE on the same rows agree
    fl = s["first_losses"]
    assert fl["hf_ref"]["ce"] == pytest.approx(fl["gere_tm"]["ce"], rel=0.02)


@pytest.mark.slow
def test_bench_lora_smoke(bench_dirs):
    """One full and one LoRA worker: LoRA trains only its adapters and both kinds report."""
    data = _run("bench_lora", *bench_dirs)
    s = data["summary"]
    assert s["full"]["trainable"] == s["full"]["parameters"]
    assert 0 < s["lora"]["trainable"] < 0.05 * s["lora"]["parameters"]
    for kind in ("full", "lora"):
        assert s[kind]["step_s"]["median"] > 0 and s[kind]["peak_rss_mib"]["median"] > 0
    for ratio in ("step_time", "peak_rss"):
        assert math.isfinite(s["lora_vs_full"][ratio]["median_of_ratios"])
    assert "lora / full" in data["stdout"]


def test_bench_optimizer_smoke(bench_dirs):
    """One process: torch's fused AdamW (the shipped DeepSpeed configs' optimizer) gives the
    same weights as the foreach one, and both are timed."""
    data = _run_one_process("bench_optimizer", bench_dirs[0])
    assert set(data["median_s"]) == {"torch AdamW foreach", "torch AdamW fused"}
    assert data["max_weight_diff"] < 1e-5 and all(v > 0 for v in data["median_s"].values())


def test_bench_eval_smoke(bench_dirs):
    """One process: one evaluation point of a tiny suite of the benchmark's kinds, scored by the
    former paths and the packed one; fp32, so the numbers agree and no prediction differs."""
    data = _run_one_process("bench_eval", bench_dirs[0])
    assert data["variants"] == ["rows", "tree", "packed"] and data["bf16"] is False
    kinds = {"sentiment", "topic", "cloze", "texts_ppl"}
    assert set(data["sets"]) == kinds
    for name, s in data["sets"].items():
        assert set(s["against"]) == {"rows", "tree"}, name
        assert all(t > 0 for t in s["seconds"].values()), name
        for c in s["against"].values():
            assert c.get("max_score_difference", 0.0) < 1e-5, name
            assert c.get("predictions_differing", 0) == c.get("outcomes_differing", 0) == 0, name
    assert data["sets"]["texts_ppl"]["against"]["rows"]["relative_difference"] < 1e-5
    assert set(data["speedup"]) == {"rows", "tree"} and data["speedup"]["rows"] > 0
    balance = data["perplexity_busiest_rank_of_two"]["texts_ppl"]
    assert balance["planned"] <= balance["former"]


def test_bench_packing_smoke(bench_dirs):
    """One process: the trainer's step on padded and on packed micro-batches of the same rows;
    packing removes the padding and, in fp32, gives the same losses."""
    data = _run_one_process("bench_packing", bench_dirs[0])
    pad = data["padding_fraction"]
    assert pad["packed"] == 0.0 < pad["padded"]
    assert data["token_slots"]["packed"] == data["real_tokens"] < data["token_slots"]["padded"]
    assert data["max_loss_difference"] < 1e-4 and data["bf16"] is False
    assert all(v > 0 for v in data["seconds_per_micro_batch"].values())


def test_bench_generate_smoke(bench_dirs):
    """One process: greedy decoding from the KV cache and by the whole-sequence loop; fp32, so
    every continuation is the same."""
    data = _run_one_process("bench_generate", bench_dirs[0])
    assert data["continuations_differing"] == 0 and data["new_tokens"] > 0
    assert all(v > 0 for v in data["cpu_seconds_per_prompt"].values())


def test_bench_linear_ce_smoke(bench_dirs):
    """One process: the plain LM head + CE and the chunked one agree and are both timed."""
    data = _run_one_process("bench_linear_ce", bench_dirs[0])
    assert data["relative_difference"]["value"] < 1e-3
    assert all(v > 0 for v in data["cpu_seconds"].values())


def test_bench_teacher_pass_smoke(bench_dirs):
    """One process: every batching of the teacher pass (file order or grouped by length, with
    or without the LM head) captures the same features, and grouping never pads more."""
    data = _run_one_process("bench_teacher_pass", bench_dirs[0])
    assert len(data["median_s"]) == 5 and data["max_relative_feature_diff"] < 0.1
    pad = data["padding_share"]
    assert pad["grouped + LM head"] <= pad["file order + LM head"]


@pytest.mark.slow
def test_bench_peer_smoke(bench_dirs, tmp_path):
    """gere-ds alone (no snapshot of the authors' repository here): both shipped ZeRO configs
    train the peer work's shape on the tiny model under the probe, which records every step and
    the teacher pass on both ranks."""
    out = bench_dirs[0]
    proc = subprocess.run([sys.executable, "bench/bench_peer.py", "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=ds_env(),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    data = json.loads((out / "bench_peer-smoke.json").read_text())
    runs = {r["impl"]: r for r in data["runs"]}
    assert set(runs) == {"gere-ds zero3", "gere-ds zero2"}
    for r in runs.values():
        assert r["steps"] == 3 and r["tok_s"] > 0 and r["teacher_s"] > 0
        assert r["peak_rss_gib"] > 0.1 and "ratio_to_reference" not in r
