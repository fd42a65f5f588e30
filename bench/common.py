"""Shared pieces of the benchmarks: machine and versions, the bench model and data, launching a
worker under the real `deepspeed` launcher, per-step RSS sampling, medians, tables and JSON.

Every benchmark is one script that is both the driver (plain `python bench/X.py [--smoke]`: it
builds the assets, launches itself under `deepspeed --num_gpus 2 ... --worker`, prints the table
and writes bench/results/X[-smoke].json) and the worker (the same file under the launcher).
Baselines are always measured in the same process tree as what they are compared with,
interleaved step by step, and reported as ratios of medians.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
KEPT = REPO / "results"  # full runs whose numbers the docs quote are committed there


def result_dir(smoke: bool) -> Path:
    """Where a benchmark writes: smoke runs to the ignored bench/results, full runs to results/."""
    return RESULTS if smoke else KEPT


# ----------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ModelSpec:
    """The bench model: a Llama built from a config, GPT-2 tokenizer (vocab 50,257)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int  # tokens per row (task rows and replay rows are cut to this)
    micro_batch: int  # rows per rank per step
    tie_embeddings: bool = True

    @property
    def tag(self) -> str:
        return (f"llama-h{self.hidden}-l{self.layers}-i{self.intermediate}-"
                f"{'tied' if self.tie_embeddings else 'untied'}")


# hidden 384, 6 layers, vocab 50,257: ~30M parameters, 1,024 tokens per optimizer step on 2 ranks
FULL = ModelSpec(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, seq=128,
                 micro_batch=4)
SMOKE = ModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seq=32,
                  micro_batch=2)

# Llama-3.1-8B, for the bytes-per-token projections
LLAMA_8B = {"hidden": 4096, "vocab": 128256, "replay_samples": 1000, "replay_len": 563}


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_model": platform.processor() or "unknown",
                            "logical_cpus": os.cpu_count(),
                            "usable_cpus": len(os.sched_getaffinity(0)),
                            "python": platform.python_version(), "os": platform.platform(),
                            "torch": torch.__version__}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        info["avx512_bf16"] = " avx512_bf16" in flags
        info["amx_bf16"] = " amx_bf16" in flags
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    for name in ("deepspeed", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 -- reported, not fatal
            info[name] = f"unavailable ({type(err).__name__})"
    info["torch_threads"] = torch.get_num_threads()
    info["load_average"] = os.getloadavg()
    return info


# ----------------------------------------------------------------------------- utilisation


def gemm_rate(m: int, k: int, n: int, dtype: Any, seconds: float = 2.0) -> float:
    """FLOP/s of one thread multiplying [m, k] by [k, n] matrices of ``dtype`` (the model's
    shapes): the machine's attainable rate, measured the way the model uses it."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b  # warm-up: kernels chosen, caches filled
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2.0 * m * k * n * count / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def spread(values: Iterable[float]) -> dict[str, float]:
    vals = sorted(values)
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median of per-round ratios num[i]/den[i] (rounds interleaved, so load drifts cancel),
    with the ratio of medians beside it."""
    pairs = [a / b for a, b in zip(num, den) if b > 0]
    return {"median_of_ratios": median(pairs), "ratio_of_medians": median(num) / median(den),
            "min": min(pairs) if pairs else float("nan"),
            "max": max(pairs) if pairs else float("nan"), "rounds": len(pairs)}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def write_result(name: str, smoke: bool, payload: dict[str, Any], out_dir: Path | None = None
                 ) -> Path:
    from gere_ds.storage.atomic import write_text_atomic

    out_dir = Path(out_dir) if out_dir else RESULTS
    path = out_dir / f"{name}{'-smoke' if smoke else ''}.json"
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))
    return path


# ----------------------------------------------------------------------------- driver


WORLD = 2  # ranks of every benchmark launch


def start_worker(config_path: str) -> tuple[Any, Any, int]:
    """A worker's start under the launcher: the run config, its checked inputs (before any
    collective, as the trainer does) and this rank, with the process group up."""
    from gere_ds.config import load_config
    from gere_ds.training.inputs import validate_inputs
    from gere_ds.runtime import dist

    cfg = load_config(config_path)
    inputs = validate_inputs(cfg, dist.world_size())
    dist.init()
    return cfg, inputs, dist.rank()


def bench_parser(doc: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (driver and hidden worker side); a script adds
    its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--assets", default=None, help="assets folder (default bench/results/assets)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def run_worker_and_exit(worker: Callable[[argparse.Namespace], None],
                        args: argparse.Namespace) -> NoReturn:
    """Run the worker side; it writes its result file and passes a barrier on every rank."""
    from gere_ds.runtime import dist

    worker(args)
    dist.exit_process(0)  # also skips the HF Trainer's accelerate state teardown


@dataclass
class BenchRun:
    """The driver's settings, resolved from the common options."""

    name: str
    smoke: bool
    spec: ModelSpec
    reps: int
    warmup: int
    out_dir: Path
    paths: dict[str, str]
    machine: dict[str, Any]

    @property
    def log_tag(self) -> str:
        return f"{self.name}{'-smoke' if self.smoke else ''}"

    def payload(self, wall_s: float, launcher: str, **extra: Any) -> dict[str, Any]:
        """The result JSON: machine (with the load average at the end), model, command."""
        self.machine["load_average_end"] = os.getloadavg()
        return {"benchmark": self.name, "smoke": self.smoke, "machine": self.machine,
                "model": self.spec.__dict__, "world_size": WORLD, "reps": self.reps,
                "warmup": self.warmup, "wall_s": wall_s, "command": command_line(),
                "launcher": launcher, **extra}

    def header(self) -> str:
        m = self.machine
        return (f"{self.name}: {m['cpu_model']}, {m['usable_cpus']} cpus, torch {m['torch']}, "
                f"deepspeed {m['deepspeed']}, transformers {m['transformers']}; model "
                f"{self.spec.tag}, seq {self.spec.seq}, micro batch {self.spec.micro_batch} x "
                f"{WORLD} ranks; {self.reps} rounds (+{self.warmup} warm-up); load average "
                f"{m['load_average'][0]:.2f} -> {m['load_average_end'][0]:.2f}")


def bench_run(name: str, args: argparse.Namespace) -> BenchRun:
    """Resolve the common options and build the benchmark's model and data."""
    spec = SMOKE if args.smoke else FULL
    assets = Path(args.assets) if args.assets else RESULTS / "assets"
    return BenchRun(name=name, smoke=args.smoke, spec=spec,
                    reps=args.reps or (1 if args.smoke else 7),
                    warmup=args.warmup if args.warmup is not None else 1,
                    out_dir=Path(args.out) if args.out else RESULTS,
                    paths=build_assets(spec, assets, n_task=2 * spec.micro_batch * WORLD,
                                       n_replay=2 * spec.micro_batch * WORLD),
                    machine=machine_info())


# ----------------------------------------------------------------------------- memory


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """Peak RSS of this process since it started (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next step's peak RSS is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssPeak:
    """Samples this process's RSS every ``interval`` s in a thread while the block runs.

    Use only around steps that are NOT timed: the thread takes the GIL now and then.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:  # noqa: PYI034
        malloc_trim()
        self.start = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


MIB = 2**20


# ----------------------------------------------------------------------------- assets

_SUBJECTS = ["The river", "A young teacher", "The old library", "Our city council", "The museum",
             "A small village", "The research team", "The football club", "The orchestra",
             "A local farmer", "The railway company", "The university", "The island"]
_VERBS = ["opened", "described", "built", "studied", "celebrated", "visited", "repaired",
          "announced", "painted", "measured", "discovered", "organised", "recorded"]
_OBJECTS = ["a new bridge", "the northern forest", "an ancient map", "the annual festival",
            "a collection of letters", "the harbour wall", "a rare species of bird",
            "the history of the region", "a public garden", "the summer concert"]
_TAILS = ["in the early morning.", "after many years of work.", "with help from volunteers.",
          "during the spring season.", "to the surprise of visitors.", "before the rain came."]
_GOOD = ["wonderful", "delightful", "excellent", "brilliant", "lovely", "superb"]
_BAD = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing"]


def _sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join([rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                              rng.choice(_TAILS)]) for _ in range(n))


def build_assets(spec: ModelSpec, root: Path, n_task: int, n_replay: int, seed: int = 0
                 ) -> dict[str, str]:
    """Model folder (random init, saved once per spec), one sentiment task whose prompts fill
    ``spec.seq`` tokens, and a replay set whose documents are longer than ``spec.seq`` tokens.
    Reused when already built with the same sizes."""
    root = Path(root)
    model_dir = root / spec.tag
    data_dir = root / f"data-s{spec.seq}-t{n_task}-r{n_replay}-seed{seed}"
    paths = {"model": str(model_dir), "train": str(data_dir / "sentiment_train.jsonl"),
             "test": str(data_dir / "sentiment_test.jsonl"),
             "replay": str(data_dir / "replay.jsonl")}
    if not (model_dir / ".complete").is_file():
        import torch
        from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

        from gere_assets.tiny import gpt2_tokenizer_files

        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_files(root / "tokenizer_src")))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=spec.hidden,
                             intermediate_size=spec.intermediate,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.kv_heads, max_position_embeddings=2048,
                             tie_word_embeddings=spec.tie_embeddings,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
        (model_dir / ".complete").write_text("ok\n")
    if not (data_dir / ".complete").is_file():
        rng = random.Random(seed)
        data_dir.mkdir(parents=True, exist_ok=True)
        n_sent = spec.seq // 8 + 3  # ~11 tokens per sentence: always longer than seq

        def task_rows(n: int) -> str:
            out = []
            for _ in range(n):
                good = rng.random() < 0.5
                text = (f"{_sentences(rng, n_sent)} Overall the visit was "
                        f"{rng.choice(_GOOD if good else _BAD)}.")
                out.append(json.dumps({"sentence": text,
                                       "label": "positive" if good else "negative"}))
            return "\n".join(out) + "\n"

        Path(paths["train"]).write_text(task_rows(n_task))
        Path(paths["test"]).write_text(task_rows(4))
        Path(paths["replay"]).write_text("".join(
            json.dumps({"text": _sentences(rng, n_sent)}) + "\n" for _ in range(n_replay)))
        (data_dir / ".complete").write_text("ok\n")
    return paths


def run_config(paths: dict[str, str], spec: ModelSpec, output_dir: Path, strategy: str,
               teacher_cache: Path | None = None, grad_accum: int = 1, epochs: int = 1,
               gradient_checkpointing: bool = False) -> dict[str, Any]:
    """A gere-ds run config over the bench assets (bf16, ZeRO-3 CPU, weight 100)."""
    return {
        "model": paths["model"], "output_dir": str(output_dir),
        "deepspeed": str(REPO / "ds_configs" / "zero3.json"),
        "tasks": [{"name": "sentiment", "train": paths["train"], "test": paths["test"],
                   "instruction": "What is the sentiment of the review? Choose one option.",
                   "labels": ["positive", "negative"]}],
        "replay": {"data": paths["replay"], "max_len": spec.seq,
                   "num_samples": sum(1 for ln in Path(paths["replay"]).read_text().split("\n")
                                      if ln.strip()),
                   "strategy": strategy, "weight": 100.0, "teacher_batch_size": spec.micro_batch,
                   "teacher_cache": str(teacher_cache or Path(output_dir) / "teacher")},
        "train": {"epochs": epochs, "lr": 1.0e-5, "warmup_steps": 0,
                  "micro_batch_size": spec.micro_batch, "grad_accum": grad_accum,
                  "max_source_len": spec.seq - 4, "max_target_len": 4, "seed": 1, "bf16": True,
                  "gradient_checkpointing": gradient_checkpointing, "log_every": 1000000,
                  "reset_optimizer_per_task": False},
        "eval": {"enabled": False},
    }


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- launching


def ds_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def deepspeed_cmd(script: Path, args: list[str], nproc: int = 2) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent
    return [str(bindir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
            str(script), *args]


def launch(script: Path, args: list[str], nproc: int = 2, timeout: int = 3600,
           log: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the worker under `deepspeed --num_gpus nproc`; returns (exit code, output tail).
    The output streams to ``log`` (default: a temporary file) while it runs; ``env`` adds
    variables to the launch's environment."""
    import glob

    cmd = deepspeed_cmd(script, args, nproc)
    if log is None:
        log = Path(tempfile.mkstemp(prefix="bench-launch-", suffix=".log")[1])
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**ds_env(), **(env or {})}, stdout=fh,
                                stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and the ranks it started, nothing else
            proc.wait()
            code = 124
        finally:
            for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
                try:
                    if os.stat(f).st_uid == os.getuid() and not _in_use(f):
                        os.remove(f)
                except OSError:
                    pass
    return code, log.read_text()[-6000:]


def _in_use(path: str) -> bool:
    """True when some live process still maps the file (another job's shm buffer)."""
    for maps in glob_maps():
        try:
            if path in Path(maps).read_text():
                return True
        except OSError:
            continue
    return False


def glob_maps() -> list[str]:
    import glob

    return glob.glob("/proc/[0-9]*/maps")


def command_line() -> str:
    """The command that started this benchmark, as typed (relative script path)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


# ----------------------------------------------------------------------------- worker side


def gather_to_rank0(obj: Any) -> list[Any]:
    from gere_ds.runtime import dist

    return dist.all_gather_object(obj)


class Timer:
    """Accumulates wall time per name; used as ``with timer('forward'): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
        return timed

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body under ``name`` (TrainStep's ``phases`` hook)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def reset(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
