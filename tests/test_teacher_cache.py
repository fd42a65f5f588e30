"""The teacher cache: 2-bit packing, the per-kind file format and manifest, recompute on a
fingerprint mismatch / truncated / corrupted file, never a misread after a world-size change,
and (slow) the per-rank caches of a real 2-rank run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gere_ds.training.losses import teacher_topk
from gere_ds.config.sections import ReplayConfig
from gere_ds.strategies import STRATEGIES
from gere_ds.teaching.fingerprint import fingerprint
from gere_ds.teaching.teacher import TeacherJob, prepare_teacher_data, teacher_settings
from gere_ds.teaching.teacher_cache import (FEATURES_FILES, CacheWriter, TeacherFeatures,
                                            TeacherStates, TeacherTopK, check_rank_cache,
                                            pack_states, rank_dir, read_manifest, to_bf16_bits,
                                            unpack_states, write_rank_cache)

# a strategy whose teacher spec keeps each kind of data
KIND_STRATEGY = {"states": "tm", "topk": "kl", "features": "l1"}


def _spec(kind: str, k: int = 8):
    return STRATEGIES[KIND_STRATEGY[kind]](ReplayConfig(kl_topk=k), bf16=False).teacher_spec()


def load_rank_cache(folder: Path):
    """A checked cache folder read back by the spec of the kind its manifest names."""
    manifest, index = read_manifest(folder)
    return _spec(manifest["kind"]).open(folder, manifest, index)

# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("n", [1, 3, 4, 5, 64, 1001])
def test_pack_unpack_round_trip_at_2_bits_per_element(n):
    g = np.random.default_rng(n)
    states = g.integers(-1, 2, size=n).astype(np.int8)
    packed = pack_states(states)
    assert packed.dtype == np.uint8 and len(packed) == math.ceil(n / 4)  # <= 2 bits / element
    assert np.array_equal(unpack_states(packed, n), states)


def _samples(kind: str, width: int, seed: int = 0):
    g = np.random.default_rng(seed)
    out = []
    for sid, tokens in ((7, 5), (2, 1), (11, 9)):
        if kind == "states":
            out.append((sid, tokens, {"states": g.integers(-1, 2, (tokens, width))
                                      .astype(np.int8)}))
        elif kind == "topk":
            out.append((sid, tokens, {
                "topk_ids": g.integers(0, 50000, (tokens, width)).astype(np.int32),
                "topk_logp": -g.random((tokens, width)).astype(np.float16) * 20}))
        else:
            out.append((sid, tokens, {"features": to_bf16_bits(
                torch.from_numpy(g.standard_normal((tokens, width)).astype(np.float32)))}))
    return out


def _write(folder: Path, kind: str, width: int, fp: str = "f" * 64, seed: int = 0):
    samples = _samples(kind, width, seed)
    if kind == "states":
        thresholds = np.random.default_rng(seed).standard_normal((4, width)).astype(np.float32)
        write_rank_cache(folder, fp, thresholds, [(s, a["states"]) for s, _, a in samples],
                         {"rank": 0, "world_size": 1})
    else:
        w = CacheWriter(folder, fp, kind, _spec(kind).files, width, {"rank": 0, "world_size": 1})
        for sid, tokens, arrays in samples:
            w.add(sid, tokens, **arrays)
        w.finish()
    return samples


@pytest.mark.parametrize("kind,width", [("states", 10), ("topk", 6), ("features", 12)])
def test_cache_round_trip_manifest_and_memory_map(tmp_path, kind, width):
    folder = tmp_path / "rank00000-of-00001"
    samples = _write(folder, kind, width)
    assert check_rank_cache(folder, "f" * 64, kind) is None
    data = load_rank_cache(folder)
    assert type(data) is {"states": TeacherStates, "topk": TeacherTopK,
                          "features": TeacherFeatures}[kind]
    assert data.sample_ids == sorted(s for s, _, _ in samples)
    for sid, tokens, arrays in samples:
        if kind == "states":
            assert np.array_equal(data.get(sid).numpy(), arrays["states"])
        elif kind == "topk":
            ids, logp = data.get(sid)
            assert ids.dtype == torch.int32 and logp.dtype == torch.float16
            assert np.array_equal(ids.numpy(), arrays["topk_ids"])
            assert np.array_equal(logp.numpy(), arrays["topk_logp"])
        else:
            f = data.get(sid)
            assert f.dtype == torch.bfloat16 and f.shape == (tokens, width)
            assert np.array_equal(f.view(torch.int16).numpy(), arrays["features"])
    # batches are zero-padded to the micro-batch width
    batch = data.batch([11, 2], width=10)
    first = batch[0] if kind == "topk" else batch
    assert first.shape[:2] == (2, 10)
    assert not first[1, 1:].any()  # sample 2 has 1 token
    # memory-mapped, not read into memory
    mm = {"states": "_packed", "topk": "_ids", "features": "_data"}[kind]
    assert isinstance(getattr(data, mm), np.memmap)
    # the manifest: fingerprint, kind, shapes, dtypes, counts, checksums; the sizes per token
    m = json.loads((folder / "manifest.json").read_text())
    assert m["fingerprint"] == "f" * 64 and m["kind"] == kind
    tokens = sum(t for _, t, _ in samples)
    assert m["samples"] == 3 and m["tokens"] == tokens
    for name, info in m["files"].items():
        assert {"bytes", "sha256", "dtype"} <= set(info), name
    expected = {"states": 0.25 * width, "topk": 6.0 * width, "features": 2.0 * width}[kind]
    per_token = m["data_bytes"] / tokens
    if kind == "states":  # 2 bits per element, plus < 1 byte per sample of alignment
        assert expected <= per_token < expected + 3 / tokens
    else:
        assert per_token == expected


def test_a_cache_is_never_read_with_the_wrong_kind_or_fingerprint(tmp_path):
    folder = tmp_path / "rank00000-of-00001"
    _write(folder, "features", 4)
    assert "cache holds 'features'" in check_rank_cache(folder, "f" * 64, "topk")
    assert "fingerprint mismatch" in check_rank_cache(folder, "e" * 64, "features")
    assert "manifest missing" in check_rank_cache(tmp_path / "nothing", "f" * 64)


# ----------------------------------------------------------------------------- the pass


@pytest.fixture(scope="module")
def tiny_lm(gpt2_tokenizer_dir, tmp_path_factory):
    """A tiny Llama on the GPT-2 tokenizer (plain torch, one process) and 7 replay samples."""
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from gere_ds.model.capture import FinalNormCapture

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    replay = folder / "replay.jsonl"
    texts = [f"Sample number {i} talks about " + "the river and the bridge " * (i % 4 + 1)
             for i in range(7)]
    replay.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    replay_ids = {i: tok(t, add_special_tokens=False)["input_ids"][:24]
                  for i, t in enumerate(texts)}

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    return {"model": model, "forward": forward, "capture": FinalNormCapture(model),
            "replay_ids": replay_ids, "pad": tok.eos_token_id, "hidden": 32,
            "model_dir": str(folder / "model"), "replay": str(replay)}


def _prepare(lm, kind, root, fp, logs, settings=None, shard=None, k=8):
    job = TeacherJob(_spec(kind, k), lm["forward"], lm["capture"], lm["replay_ids"],
                     shard or sorted(lm["replay_ids"]), lm["hidden"], 3, lm["pad"],
                     torch.device("cpu"), root, fp, settings=settings)
    return prepare_teacher_data(job, logs.append, lambda i, n: None)


def _settings(strategy, world=1, **kw):
    term = STRATEGIES[strategy](ReplayConfig(strategy=strategy, **kw), bf16=False)
    return teacher_settings(term.name, term.teacher_spec(), num_samples=1000, max_len=24,
                            world_size=world, seed=1, bf16=False, n_replay=7)


@torch.no_grad()
def test_teacher_pass_holds_what_each_strategy_needs(tiny_lm, tmp_path):
    lm = tiny_lm
    ids = torch.tensor([lm["replay_ids"][5]])
    logits = lm["forward"](ids, torch.ones_like(ids))
    h = lm["capture"].pop()[0]
    logs: list[str] = []
    topk = _prepare(lm, "topk", tmp_path, "a" * 64, logs)
    want_ids, want_logp = teacher_topk(logits[0], 8)
    got_ids, got_logp = topk.get(5)
    assert torch.equal(got_ids, want_ids)
    assert torch.allclose(got_logp.float(), want_logp, atol=1e-2, rtol=1e-3)  # float16
    feats = _prepare(lm, "features", tmp_path, "b" * 64, logs)
    assert torch.equal(feats.get(5), h.to(torch.bfloat16))
    states = _prepare(lm, "states", tmp_path, "c" * 64, logs)
    want = (h >= states.hi).to(torch.int8) - (h <= states.lo).to(torch.int8)
    assert torch.equal(states.get(5), want)
    assert all(d.sample_ids == list(range(7)) for d in (topk, feats, states))
    assert sum("teacher pass: computing" in line for line in logs) == 3


def test_fingerprint_includes_strategy_topk_and_world_size(tiny_lm):
    lm = tiny_lm

    def fp(strategy, **kw):
        return fingerprint(lm["model_dir"], lm["model_dir"], lm["replay"],
                           _settings(strategy, **kw))

    base = fp("kl", kl_topk=64)
    assert fp("kl", kl_topk=64) == base
    assert len({base, fp("kl", kl_topk=32), fp("l1"), fp("l2"), fp("tm"),
                fp("kl", kl_topk=64, world=2)}) == 6
    # settings a kind does not use do not invalidate its cache
    assert fp("kl", kl_topk=64, threshold_k=2.0) == base
    assert fp("tm", threshold_k=1.0) != fp("tm", threshold_k=2.0)


def test_fingerprint_mismatch_recomputes_with_a_log_line(tiny_lm, tmp_path):
    lm = tiny_lm
    logs: list[str] = []
    s1 = _settings("kl", kl_topk=8)
    fp1 = fingerprint(lm["model_dir"], lm["model_dir"], lm["replay"], s1)
    _prepare(lm, "topk", tmp_path, fp1, logs, s1)
    _prepare(lm, "topk", tmp_path, fp1, logs, s1)
    assert "computing" in logs[0] and "teacher cache reused" in logs[1]
    # another k: another fingerprint; the log line says what changed
    s2 = _settings("kl", kl_topk=4)
    fp2 = fingerprint(lm["model_dir"], lm["model_dir"], lm["replay"], s2)
    out = _prepare(lm, "topk", tmp_path, fp2, logs, s2, k=4)
    assert "fingerprint mismatch" in logs[2] and "kl_topk 8 -> 4" in logs[2], logs[2]
    assert out.k == 4
    # same settings, other replay file content: the files' hashes change the fingerprint
    replay2 = tmp_path / "replay2.jsonl"
    replay2.write_text(Path(lm["replay"]).read_text() + '{"text": "one more"}\n')
    fp3 = fingerprint(lm["model_dir"], lm["model_dir"], str(replay2), s2)
    assert fp3 != fp2
    _prepare(lm, "topk", tmp_path, fp3, logs, s2, k=4)
    assert "fingerprint mismatch" in logs[3] and "replay file changed" in logs[3], logs[3]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_cache_is_detected_and_recomputed(tiny_lm, tmp_path, damage):
    lm = tiny_lm
    logs: list[str] = []
    fp = "d" * 64
    first = _prepare(lm, "features", tmp_path, fp, logs)
    want = {s: first.get(s).clone() for s in first.sample_ids}
    del first
    folder = rank_dir(tmp_path, fp, 0, 1)
    target = folder / "features.bin"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2])
    elif damage == "flip":  # same size: only the checksum can tell
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "delete":
        (folder / "index.npy").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    reason = check_rank_cache(folder, fp, "features")
    expected = {"truncate": "features.bin truncated", "flip": "features.bin checksum mismatch",
                "delete": "index.npy truncated or missing", "manifest": "manifest unreadable"}
    assert reason is not None and reason.startswith(expected[damage]), reason
    again = _prepare(lm, "features", tmp_path, fp, logs)
    assert "computing" in logs[-1] and reason in logs[-1]
    assert check_rank_cache(folder, fp, "features") is None
    for s, f in want.items():
        assert torch.equal(again.get(s), f)


def test_world_size_change_uses_other_folders_and_never_misreads(tiny_lm, tmp_path,
                                                                monkeypatch):
    """A 2-rank cache (two disjoint shards) is not read by a 1-rank run of the same inputs."""
    from gere_ds.data.sampler import replay_shard

    lm = tiny_lm
    logs: list[str] = []
    s2 = _settings("tm", world=2)
    fp2 = fingerprint(lm["model_dir"], lm["model_dir"], lm["replay"], s2)
    # what rank 0 of a 2-rank run writes (one process: its thresholds come from its shard only)
    with monkeypatch.context() as m:
        m.setenv("RANK", "0")
        m.setenv("WORLD_SIZE", "2")
        _prepare(lm, "states", tmp_path, fp2, logs, s2, shard=replay_shard(7, 2, 0, seed=1))
    assert (tmp_path / fp2[:16] / "rank00000-of-00002" / "manifest.json").is_file()
    s1 = _settings("tm", world=1)
    fp1 = fingerprint(lm["model_dir"], lm["model_dir"], lm["replay"], s1)
    assert fp1 != fp2 and rank_dir(tmp_path, fp1, 0, 1) != rank_dir(tmp_path, fp2, 0, 2)
    one = _prepare(lm, "states", tmp_path, fp1, logs, s1)
    assert "computing" in logs[-1] and "world_size 2 -> 1" in logs[-1], logs[-1]
    assert one.sample_ids == list(range(7))  # the whole replay set, not rank 0's shard


# ----------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
def test_two_rank_caches_hold_disjoint_shards_covering_the_replay_set(tiny_config, tiny_paths,
                                                                      tmp_path):
    """A real 2-rank run of launch/train.py (kl, 1 step per task) writes one cache folder per
    rank; their samples are disjoint and together the replay set; the cached top-k equals the
    base model's own top-k; the run logs train/kl."""
    from conftest import run_deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_ds.data.encode import encode_replay
    from gere_ds.data.replay import load_replay_texts

    cache = tmp_path / "shared_cache"
    cfg = tiny_config("kl", name="cache2", train={"max_steps_per_task": 1},
                      eval={"enabled": False})
    out = run_deepspeed("launch/train.py", ["--config", str(cfg), "replay.kl_topk=16",
                                            f"replay.teacher_cache={cache}"], nproc=2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folders = sorted(cache.glob("*/rank*-of-00002"))
    assert [f.name for f in folders] == ["rank00000-of-00002", "rank00001-of-00002"]
    assert not (tmp_path / "run_cache2" / "teacher").exists()  # the shared dir was used
    data = [load_rank_cache(f) for f in folders]
    assert all(check_rank_cache(f, json.loads((f / "manifest.json").read_text())["fingerprint"],
                                "topk") is None for f in folders)
    ids0, ids1 = set(data[0].sample_ids), set(data[1].sample_ids)
    texts = load_replay_texts(tiny_paths["replay"], 1000)
    assert not ids0 & ids1 and ids0 | ids1 == set(range(len(texts)))
    # the cached top-k of a sample of rank 1 equals a plain forward of the base model
    tok = AutoTokenizer.from_pretrained(tiny_paths["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"], dtype=torch.float32).eval()
    sid = min(ids1)
    x = torch.tensor([encode_replay(tok, texts[sid], 48)])
    with torch.no_grad():
        want_ids, want_logp = teacher_topk(model(input_ids=x).logits[0], 16)
    got_ids, got_logp = data[1].get(sid)
    assert torch.allclose(got_logp.float(), want_logp, atol=2e-2, rtol=1e-3)
    assert (got_ids == want_ids).float().mean() > 0.95  # near-ties may swap
    steps = [json.loads(line) for line in
             (tmp_path / "run_cache2" / "train_steps.jsonl").read_text().splitlines()]
    assert steps and all("train/kl" in s for s in steps), steps[:1]
    # the weight (dy) is logged where a replay row had a non-zero term
    assert all("train/kl_weight" in s for s in steps if s["train/kl"] > 0), steps[:1]


# ----------------------------------------------------------------------------- run-folder safety


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_fingerprint_hashes_whole_weights_and_reuses_unchanged_digests(tiny_lm, tmp_path):
    import os
    import shutil

    from gere_ds.storage.digest_cache import DigestCache

    model = tmp_path / "model"
    shutil.copytree(tiny_lm["model_dir"], model)
    weights = next(model.glob("*.safetensors"))
    assert weights.stat().st_size > 4 << 20  # big enough that edges-only hashing skipped bytes
    settings = _settings("tm")
    digests = tmp_path / "teacher" / "file_digests.json"

    def fp():
        cache = DigestCache(digests)
        value = fingerprint(str(model), str(model), tiny_lm["replay"], settings, cache)
        cache.save()
        return value, cache

    before, first = fp()
    assert first.hashed == [str(weights.resolve())]
    again, second = fp()
    assert again == before and second.hashed == []  # unchanged: the kept digest, no re-read
    # change one byte in the middle of the weights, in place (same size, same inode)
    st = weights.stat()
    with open(weights, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, third = fp()
    assert third.hashed == [str(weights.resolve())] and changed != before
    assert fingerprint(str(model), str(model), tiny_lm["replay"], settings) == changed


def test_cache_writer_removes_only_temp_folders_of_dead_processes(tmp_path):
    import os
    import socket

    folder = rank_dir(tmp_path, "f" * 64, 0, 1)
    folder.parent.mkdir(parents=True)
    host, dead, alive = socket.gethostname(), _dead_pid(), os.getppid()
    names = {"dead_here": f"{folder.name}.tmp{dead}@{host}",
             "no_owner": f"{folder.name}.tmp{dead}",
             "alive_here": f"{folder.name}.tmp{alive}@{host}",
             "dead_elsewhere": f"{folder.name}.tmp{dead}@another-node-7"}
    for name in names.values():
        (folder.parent / name).mkdir()
    writer = CacheWriter(folder, "f" * 64, "features", FEATURES_FILES, 4)
    writer.abort()
    left = {k for k, name in names.items() if (folder.parent / name).exists()}
    assert left == {"alive_here", "dead_elsewhere", "no_owner"}  # only dead owners' go


def test_teacher_scratch_checks_free_space_and_removes_dead_scratch(tiny_lm, tmp_path,
                                                                   monkeypatch):
    import os
    import socket
    from collections import namedtuple

    import gere_ds.teaching.teacher as T
    from gere_ds.errors import InputError

    scratch_root = tmp_path / "scratch"
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    host = socket.gethostname()
    dead = scratch_root / f"gere-teacher-{_dead_pid()}@{host}+abc"
    alive = scratch_root / f"gere-teacher-{os.getppid()}@{host}+xyz"
    dead.mkdir()
    alive.mkdir()
    fp = fingerprint(tiny_lm["model_dir"], tiny_lm["model_dir"], tiny_lm["replay"],
                     _settings("tm"))
    logs: list[str] = []
    _prepare(tiny_lm, "states", tmp_path / "cache", fp, logs)
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in scratch_root.iterdir()) == [alive.name]  # ours is gone too

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InputError, match=r"scratch files need .* GiB in .*scratch.* set TMPDIR"):
        _prepare(tiny_lm, "states", tmp_path / "cache2", fp, logs)
