"""The DeepSpeed JSON of a run: which file, and every "auto" value in it filled from the run config.

A config written for the Hugging Face Trainer works as is: the keys the Trainer fills from its
arguments are filled here from ``train`` (batch sizes, clipping, precision, AdamW), the keys it
derives from the model's hidden size get the same values (transformers' DeepSpeed integration),
and the rest is either refused with one line naming the key or mapped with one note.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Callable

from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError
from gere_ds.training.batch_split import AUTO, resolve_micro_batch, rows_per_rank

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# `deepspeed: auto` picks one of these by DeepSpeed's accelerator (any non-CPU accelerator gets
# the GPU ones) and by what fits (auto_stage); a CPU has nothing to offload to
AUTO_CONFIGS = {("cpu", 2): "zero2.json", ("cpu", 3): "zero3.json",
                ("cuda", 2): "zero2_gpu.json", ("cuda", 3): "zero3_gpu.json",
                ("cuda", "offload"): "zero3_offload.json"}
# ZeRO-2 when its model states take at most this share of one rank's memory: the rest is left
# for activations, gradient buckets, the teacher pass, evaluation and the allocator. At 0.35 an
# 8B model on 8 x 80 GB cards (about 85e9 bytes each as reported) gets ZeRO-3 with a margin, not
# by a rounding of the card's size (docs/performance.md)
REPLICATED_SHARE = 0.35
# ZeRO-3 when its partitioned states take at most this share: the rest holds the gathered
# layers, the activations and the logits of the supervised positions
PARTITIONED_SHARE = 0.7
ADAM_TYPES = ("adam", "adamw")

Note = Callable[[str], None]

# the minimum of every rank's memory, once the ranks have agreed on it (agree_on_memory)
_agreed_memory: dict[str, int] = {}


def accelerator_name() -> str:
    """DeepSpeed's accelerator ("cpu", "cuda", ...): honours DS_ACCELERATOR, else detects."""
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().device_name())


@functools.lru_cache(maxsize=16)
def model_parameters(model: str) -> int | None:
    """The parameters of a model folder, counted on the meta device (nothing is loaded); None
    when its config cannot be read. Kept per folder: a launch resolves its DeepSpeed JSON
    several times (input checks, the planned stage, the engine), and building an 8B model's
    modules, even on the meta device, takes seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- no estimate: auto keeps the safe choice (ZeRO-3)
        return None
    return sum(p.numel() for p in net.parameters())


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node: LOCAL_SIZE (deepspeed launcher) or LOCAL_WORLD_SIZE (torchrun); the
    whole world without a launcher."""
    import os

    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    return max(int(local), 1) if local else max(world_size, 1)


def node_count(world_size: int) -> int:
    """Nodes of the job: CROSS_SIZE (deepspeed launcher), else the world over a node's ranks."""
    import os

    nodes = os.environ.get("CROSS_SIZE")
    return max(int(nodes), 1) if nodes else max(world_size // ranks_per_node(world_size), 1)


def host_memory_bytes() -> int:
    """This node's RAM over its ranks."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
    return ram // max(int(local), 1)


def local_memory_bytes(accelerator: str) -> int:
    """This rank's memory: its GPU's free memory, or on a CPU the node's RAM over its ranks."""
    import os

    if accelerator != "cpu":
        import torch

        index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
        return int(torch.cuda.mem_get_info(index)[0])
    return host_memory_bytes()


def agree_on_memory(accelerator: str | None = None) -> int:
    """The least memory of any rank, all-reduced once after the process group starts (every
    rank calls it): from then on every rank's ``auto`` sees the same number and picks the same
    stage, so mixed cards cannot pick different stages and hang."""
    import torch

    from gere_ds.runtime import dist

    accelerator = accelerator or accelerator_name()
    mine = local_memory_bytes(accelerator)
    if dist.is_initialized() and dist.world_size() > 1:
        t = torch.tensor([-float(mine)], dtype=torch.float64, device=dist.device())
        mine = int(-dist.all_reduce_max(t).item())
    _agreed_memory[accelerator] = mine
    return mine


def rank_memory_bytes(accelerator: str) -> int:
    """One rank's memory for ``auto``: the ranks' agreed minimum once agree_on_memory ran, else
    this rank's own (checks before the process group starts)."""
    if accelerator in _agreed_memory:
        return _agreed_memory[accelerator]
    return local_memory_bytes(accelerator)


def zero2_state_bytes(params: int, trainable: int, world_size: int, bf16: bool) -> int:
    """Model states per rank under ZeRO-2: the weights on every rank, and for the trainable
    ones an fp32 master copy, two Adam moments and an fp32 gradient partition (16 bytes / N)."""
    return (2 if bf16 else 4) * params + 16 * trainable // max(world_size, 1)


def zero3_state_bytes(params: int, trainable: int, world_size: int, bf16: bool) -> int:
    """Model states per rank under ZeRO-3: everything of ZeRO-2, the weights partitioned too."""
    return ((2 if bf16 else 4) * params + 16 * trainable) // max(world_size, 1)


Stage = int | str  # 2, 3 or "offload" (ZeRO-3 with optimizer and parameters on the host)


def auto_stage(cfg: RunConfig, world_size: int, accelerator: str,
               memory: int | None = None, nodes: int | None = None,
               host_memory: int | None = None) -> tuple[Stage, str]:
    """The stage ``deepspeed: auto`` takes, and why (for the log): ZeRO-2 when the model fits
    replicated (its ZeRO-2 states within REPLICATED_SHARE of a rank's memory) on one node; else
    ZeRO-3 when its partitioned states fit PARTITIONED_SHARE; else ZeRO-3 with offload to the
    host when there is a config for it and the host holds the states; else one InputError.
    ZeRO-3's per-forward parameter gathers buy nothing for a model that fits
    (bench/bench_peer.py measures the difference); across nodes ZeRO-3 writes a partition per
    rank, so every node can resume from its own files. ``memory`` (a rank's), ``nodes`` and
    ``host_memory`` (a rank's share of its node's RAM) default to this job's."""
    params = model_parameters(cfg.model)
    if params is None:
        return 3, f"{cfg.model}: parameters not countable, so ZeRO-3"
    trainable = 0 if cfg.train.lora is not None else params  # adapters: a rounding error
    have = rank_memory_bytes(accelerator) if memory is None else memory
    nodes = node_count(world_size) if nodes is None else nodes
    gb, bf16 = 1e9, cfg.train.bf16
    size = f"{params / 1e6:,.0f}M parameters"
    need2 = zero2_state_bytes(params, trainable, world_size, bf16)
    fits2 = need2 <= REPLICATED_SHARE * have
    if fits2 and nodes == 1:
        return 2, (f"{size}: ZeRO-2 model states {need2 / gb:.1f} GB per rank <= "
                   f"{REPLICATED_SHARE:.0%} of {have / gb:.1f} GB")
    why2 = (f"{nodes} nodes" if fits2 else f"ZeRO-2 model states {need2 / gb:.1f} GB per rank "
            f"> {REPLICATED_SHARE:.0%} of {have / gb:.1f} GB")
    need3 = zero3_state_bytes(params, trainable, world_size, bf16)
    if need3 <= PARTITIONED_SHARE * have:
        return 3, f"{size}: {why2}, so ZeRO-3 ({need3 / gb:.1f} GB per rank)"
    why3 = (f"{size}: ZeRO-3 model states {need3 / gb:.1f} GB per rank > "
            f"{PARTITIONED_SHARE:.0%} of {have / gb:.1f} GB")
    host = host_memory_bytes() if host_memory is None else host_memory
    kind = "cpu" if accelerator == "cpu" else "cuda"
    if (kind, "offload") in AUTO_CONFIGS and need3 <= PARTITIONED_SHARE * host:
        return "offload", f"{why3}, so ZeRO-3 with offload to {host / gb:.1f} GB of host RAM"
    where = ("and a CPU has nothing to offload to" if kind == "cpu" else
             f"and over {PARTITIONED_SHARE:.0%} of the host's {host / gb:.1f} GB per rank")
    raise InputError(f"deepspeed: auto: {why3} {where}; use more ranks, LoRA (train.lora) or "
                     f"name a DeepSpeed JSON", field="deepspeed")


def ds_config_path(deepspeed: str, accelerator: str | None = None, cfg: RunConfig | None = None,
                   world_size: int = 1, note: Note | None = None) -> Path:
    """The JSON file a run uses: ``deepspeed`` itself, or for "auto" the shipped config for the
    accelerator (GPU: overlapped communication, buckets from the hidden size) at the stage
    ``auto_stage`` picks (ZeRO-3 when no run config is given)."""
    if deepspeed != "auto":
        return Path(deepspeed)
    name = accelerator or accelerator_name()
    kind = "cpu" if name == "cpu" else "cuda"
    stage, why = auto_stage(cfg, world_size, name) if cfg is not None else (3, "")
    path = DS_CONFIG_DIR / AUTO_CONFIGS[(kind, stage)]
    if note is not None and why:
        note(f"deepspeed: auto -> ds_configs/{path.name} ({why}; name a file to choose)")
    return path


def read_ds_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("DeepSpeed config not found", file=str(path), field="deepspeed")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", file=str(path), line=err.lineno) from None
    if not isinstance(ds, dict):
        raise InputError("a DeepSpeed config is a JSON object", file=str(path))
    return ds


def model_hidden_size(model: str) -> int | None:
    """hidden_size of a model folder's config.json (the largest of hidden_sizes, or the text
    config's, as transformers reads it); None when there is none."""
    try:
        conf = json.loads((Path(model) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for node in (conf, conf.get("text_config") or {}):
        if isinstance(node.get("hidden_size"), int):
            return int(node["hidden_size"])
        if node.get("hidden_sizes"):
            return int(max(node["hidden_sizes"]))
    return None


def _node(ds: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    node = ds
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    return node


def _match(ds: dict[str, Any], keys: tuple[str, ...], value: Any, file: str) -> None:
    """Fill an "auto" (or absent) key; an explicit value must equal the run config's."""
    node = _node(ds, keys)
    current = node.get(keys[-1], "auto")
    if current == "auto":
        node[keys[-1]] = value
    elif current != value:
        name = ".".join(keys)
        raise InputError(f"{name}={current!r} disagrees with the run config ({value!r}); "
                         f"set it to \"auto\" or make them equal", file=file, field=name)


def _fill_only(ds: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """Replace an "auto" value; anything else (or absence) is the user's choice."""
    node = ds
    for k in keys[:-1]:
        node = node.get(k)
        if not isinstance(node, dict):
            return
    if node.get(keys[-1]) == "auto":
        node[keys[-1]] = value


def _autos(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{path}.{key}" if path else key)]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _autos(v, f"{path}.{i}")]
    return [path] if node == "auto" else []


def _precision(ds: dict[str, Any], cfg: RunConfig, file: str) -> None:
    t = cfg.train
    if ds.get("amp", {}).get("enabled") not in (None, False, "auto"):
        raise InputError("apex amp is not supported; gere-ds trains in bf16 or fp32 "
                         "(train.bf16)", file=file, field="amp.enabled")
    if ds.get("amp", {}).get("enabled") == "auto":
        ds["amp"]["enabled"] = False
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise InputError("fp16 training is not supported (loss scaling and the TM dead-band "
                         "assume bf16 or fp32); set it to false or \"auto\" and use train.bf16",
                         file=file, field="fp16.enabled")
    if isinstance(fp16, dict) and fp16.get("enabled") == "auto":
        fp16["enabled"] = False
    _match(ds, ("bf16", "enabled"), t.bf16, file)


def _optimizer(ds: dict[str, Any], cfg: RunConfig, file: str, accelerator: str) -> None:
    t = cfg.train
    opt = ds.get("optimizer")
    if opt is None:
        # as the HF Trainer does without an optimizer section: AdamW from the run config
        opt = ds["optimizer"] = {"type": "AdamW", "params": {}}
        # torch's fused AdamW: one kernel on CPU and GPU, nothing to compile (bench_optimizer.py)
        opt["params"].update(torch_adam=True, fused=True)
    if str(opt.get("type", "")).lower() not in ADAM_TYPES:
        raise InputError(f"optimizer {opt.get('type')!r} is not supported; gere-ds trains with "
                         f"Adam/AdamW (train.lr, train.adam_betas, ...)", file=file,
                         field="optimizer.type")
    for keys, value in ((("optimizer", "params", "lr"), t.lr),
                        (("optimizer", "params", "betas"), list(t.adam_betas)),
                        (("optimizer", "params", "eps"), t.adam_eps),
                        (("optimizer", "params", "weight_decay"), t.weight_decay)):
        _match(ds, keys, value, file)


def _scheduler(ds: dict[str, Any], file: str, note: Note) -> None:
    sched = ds.pop("scheduler", None)
    if sched is not None:
        note(f"{file}: scheduler {sched.get('type', '?')!r} is not used: gere-ds sets every "
             f"step's lr itself (train.lr, warmup_steps, cosine to min_lr_ratio, per task)")


def _zero_buckets(ds: dict[str, Any], cfg: RunConfig, file: str) -> None:
    """The hidden-size keys, as transformers' integration fills them."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    keyed = ("reduce_bucket_size", "stage3_prefetch_bucket_size",
             "stage3_param_persistence_threshold")
    if any(zero.get(k) == "auto" for k in keyed):
        hidden = model_hidden_size(cfg.model)
        if hidden is None:
            name = next(k for k in keyed if zero.get(k) == "auto")
            raise InputError(f"\"auto\" needs the model's hidden_size, which {cfg.model}/"
                             f"config.json does not give; set a number", file=file,
                             field=f"zero_optimization.{name}")
        _fill_only(ds, ("zero_optimization", "reduce_bucket_size"), hidden * hidden)
        _fill_only(ds, ("zero_optimization", "stage3_prefetch_bucket_size"),
                   int(0.9 * hidden * hidden))
        _fill_only(ds, ("zero_optimization", "stage3_param_persistence_threshold"), 10 * hidden)
    # exports go through gere-ds's own consolidation, never DeepSpeed's 16-bit save
    _fill_only(ds, ("zero_optimization", "stage3_gather_16bit_weights_on_model_save"), False)


def _zero_on_cpu(ds: dict[str, Any], file: str, accelerator: str) -> None:
    """ZeRO-3 settings that DeepSpeed's CPU accelerator cannot run, refused before any work."""
    zero = ds.get("zero_optimization")
    if accelerator != "cpu" or not isinstance(zero, dict) or zero.get("stage") != 3:
        return
    threshold = zero.get("stage3_module_granularity_threshold", 0)
    if isinstance(threshold, (int, float)) and threshold > 0:
        # a grouped module keeps its parameters' .grad, and ZeRO-3's zero_grad then records a
        # device stream on it, which a CPU tensor has not: the first optimizer step crashes
        # (DeepSpeed 0.19.8, "unknown parameter type"); GPUs are unaffected
        raise InputError(f"{threshold!r} crashes DeepSpeed's CPU accelerator at the first "
                         f"optimizer step once a module is grouped; set 0 on CPU (it is a GPU "
                         f"setting)", file=file,
                         field="zero_optimization.stage3_module_granularity_threshold")


def check_global_batch(cfg: RunConfig, world_size: int) -> None:
    """``train.global_batch`` (when set) = micro x accumulation x ranks, or one line saying how
    to get it on this many ranks."""
    t = cfg.train
    got = rows_per_rank(cfg) * world_size
    if t.global_batch and got != t.global_batch:
        per_rank = t.global_batch / (t.micro_batch_size * world_size)
        fix = (f"set train.grad_accum={int(per_rank)}" if per_rank == int(per_rank) else
               f"{t.global_batch} rows do not split over {world_size} ranks x "
               f"{t.micro_batch_size}; use a rank count that divides it")
        raise InputError(f"{t.micro_batch_size} x {t.grad_accum} x {world_size} ranks = {got}, "
                         f"not {t.global_batch}; {fix} (or train.global_batch=0 to accept {got})",
                         field="train.global_batch")


def fill_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int, file: str,
                   accelerator: str = "cpu", note: Note | None = None) -> dict[str, Any]:
    """``ds`` with every "auto" filled from the run config (in place); one-line InputError for
    a value that disagrees or a key that cannot be filled."""
    note = note or (lambda _msg: None)
    t = cfg.train
    for keys, value in ((("train_micro_batch_size_per_gpu",), t.micro_batch_size),
                        (("gradient_accumulation_steps",), t.grad_accum),
                        (("train_batch_size",), rows_per_rank(cfg) * world_size),
                        (("gradient_clipping",), t.grad_clip)):
        _match(ds, keys, value, file)
    _precision(ds, cfg, file)
    _optimizer(ds, cfg, file, accelerator)
    _scheduler(ds, file, note)
    _zero_buckets(ds, cfg, file)
    _zero_on_cpu(ds, file, accelerator)
    left = _autos(ds)
    if left:
        raise InputError("\"auto\" that gere-ds cannot fill (no run-config value maps to it); "
                         "set a value", file=file, field=left[0])
    return ds


def device_state_bytes(cfg: RunConfig, world_size: int, ds: dict[str, Any]) -> int | None:
    """Model states per rank on the device under the JSON's ZeRO stage (offloaded: none);
    None when the model's parameters cannot be counted."""
    zero = ds.get("zero_optimization") or {}
    if zero.get("offload_param") or zero.get("offload_optimizer"):
        return 0
    params = model_parameters(cfg.model)
    if params is None:
        return None
    trainable = 0 if cfg.train.lora is not None else params
    states = zero3_state_bytes if int(zero.get("stage", 0)) >= 3 else zero2_state_bytes
    return states(params, trainable, world_size, cfg.train.bf16)


def resolve_ds_config(cfg: RunConfig, world_size: int, note: Note | None = None,
                      accelerator: str | None = None, check_batch: bool = True) -> dict[str, Any]:
    """Load the run's DeepSpeed JSON (``deepspeed: auto`` by accelerator) and fill it;
    ``check_batch`` False for evaluation, which has no optimizer step. A run config with
    ``train.micro_batch_size: auto`` gets its split here (gere_ds.training.batch_split), by the
    ranks' agreed memory."""
    accelerator = accelerator or accelerator_name()
    path = ds_config_path(cfg.deepspeed, accelerator, cfg, world_size, note)
    ds = read_ds_json(path)
    if cfg.train.micro_batch_size == AUTO:
        # the split is the run's once the ranks agreed on their memory (one split on every
        # rank); before that (input checks) it is only tried, on a copy
        agreed = accelerator in _agreed_memory or world_size == 1
        cfg = cfg if agreed else copy.deepcopy(cfg)
        resolve_micro_batch(cfg, ds, str(path), rank_memory_bytes(accelerator),
                            device_state_bytes(cfg, world_size, ds), note or (lambda _msg: None))
    if check_batch:
        check_global_batch(cfg, world_size)
    return fill_ds_config(ds, cfg, world_size, str(path), accelerator, note)
