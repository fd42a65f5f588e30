"""Run configuration: typed, documented dataclasses loaded from YAML with dotted CLI overrides.

Every knob of a run lives here with a one-line doc (``metadata["doc"]``). Loading validates types
and names; a mistake stops the run with one line naming the file, line and field, e.g.::

    configs/x.yaml:14: replay.stratgy: unknown key (did you mean 'strategy'?)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from gere_ds.atomic import write_text_atomic
from gere_ds.constants import EVAL_MODES, TRUNCATE_SOURCE
from gere_ds.errors import InputError

# how the per-row losses of a global batch become one number (docs/method.md, "Weighing rows")
REDUCTIONS = ("row", "global_micro_batch")
# what happens to a LoRA adapter between tasks (docs/lora.md, "The continual choice")
LORA_CONTINUAL = ("carry", "merge")


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field carrying its one-line documentation."""
    kw: dict[str, Any] = {"metadata": {"doc": text}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return field(**kw)


@dataclass
class TaskConfig:
    name: str = doc("short task name, used in logs, metrics and file names")
    train: str = doc("training split: .jsonl/.json/.csv/.parquet, read with `datasets`")
    test: str = doc("test split, same format as train", default="")
    instruction: str = doc("the task instruction placed before the options", default="")
    labels: list[str] = doc("the fixed label set; every example's label must be one of them",
                            default_factory=list)
    text_field: str = doc("column holding the input text (O-LoRA CL_Benchmark: sentence)",
                          default="sentence")
    label_field: str = doc("column holding the label (O-LoRA CL_Benchmark: label)", default="label")
    option_line: bool = doc("print the 'Option: <labels>' line in the prompt (false for O-LoRA's "
                            "COPA, whose text names its choices A and B)", default=True)
    test_only_labels: list[str] = doc("labels allowed in the test split only, never options; such "
                                      "rows are scored and never right in rank mode (O-LoRA's "
                                      "MNLI test has 131 rows labelled '-')",
                                      default_factory=list)


@dataclass
class ReplayConfig:
    data: str = doc("general replay set: one JSON object per line with a 'text' field", default="")
    num_samples: int = doc("use the first N documents of the replay file", default=1000)
    max_len: int = doc("replay texts are cut to this many tokens (no BOS); reference 563",
                       default=563)
    strategy: str = doc("a name in the strategy registry, gere_ds.strategies.STRATEGIES "
                        "(docs/strategies.md)", default="tm")
    weight: Union[float, str] = doc("weight w of the strategy term: a number or 'dy'", default=100.0)
    threshold_k: float = doc("thresholds are mu +- k*sigma per hidden dimension", default=1.0)
    reduction: str = doc("row: the loss is the mean over the global batch's rows of each row's "
                         "loss, dy per row (the reference recipe) | global_micro_batch: CE 1:1 "
                         "and TM over all rows of all ranks at one micro-step", default="row")
    tm_dead_band: Union[float, str] = doc(
        "0 = the reference's exact TM test (default). > 0: an opt-in rounding guard: a violation "
        "no larger than this many rounding units of the compute dtype (eps: 2^-7 bf16, 2^-23 "
        "fp32) times sigma_d, plus one rounding step, keeps its value and its place in the "
        "per-row count but passes no gradient (docs/method.md)", default=0.0)
    per_batch: int = doc("0: replay shuffled into each task's data; k>0: exactly k per global batch",
                         default=0)
    teacher_batch_size: int = doc("replay samples per forward in the teacher pass, per rank "
                                  "(grouped by length; no LM head runs for tm/l1/l2)",
                                  default=16)
    teacher_cache: str = doc("directory for the teacher cache; empty = <output_dir>/teacher "
                             "(per-rank files, no shared filesystem needed)", default="")
    kl_temperature: float = doc("temperature T of the kl strategy", default=2.0)
    kl_topk: int = doc("teacher log-probs kept per replay token for the kl strategy", default=64)
    options: dict[str, Any] = doc("settings of strategies registered outside gere_ds, by key "
                                  "(each strategy names and checks its own: docs/strategies.md)",
                                  default_factory=dict)


@dataclass
class LoraConfig:
    r: int = doc("rank of every adapter (A is r x in, B is out x r)", default=16)
    alpha: float = doc("the update is (alpha / r) * B @ A", default=32.0)
    dropout: float = doc("dropout on the adapter's input, in [0, 1)", default=0.05)
    target_modules: list[str] = doc("linear layers adapted, by the last part of their module name "
                                    "(checked against the model before training)",
                                    default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                             "o_proj"])
    continual: str = doc("carry: one adapter trained through the whole task sequence | merge: "
                         "merged into the base after each task, then a fresh adapter (no "
                         "default: a choice, see docs/lora.md)", default="")


@dataclass
class TrainConfig:
    epochs: int = doc("epochs per task", default=3)
    lr: float = doc("peak learning rate (AdamW)", default=3.0e-6)
    min_lr_ratio: float = doc("cosine decays to lr * min_lr_ratio at the end of each task",
                              default=0.0)
    warmup_steps: int = doc("linear warm-up optimizer steps at the start of each task", default=10)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    adam_betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.999])
    adam_eps: float = doc("AdamW epsilon", default=1.0e-8)
    grad_clip: float = doc("gradient-norm clipping (0 = off)", default=1.0)
    micro_batch_size: int = doc("rows per rank per forward", default=1)
    grad_accum: int = doc("micro-steps per optimizer step", default=66)
    global_batch: int = doc("if > 0, the run stops with one line unless micro_batch_size x "
                            "grad_accum x ranks equals it (a recipe's batch on any rank count)",
                            default=0)
    max_source_len: int = doc("prompt tokens kept, the BOS included (see truncate_source)",
                              default=512)
    truncate_source: str = doc("which tokens of a prompt over max_source_len are kept, in "
                               "training and evaluation alike: the tokenizer's special prefix "
                               "(BOS) plus, of the whole prompt (instruction, Option line, text, "
                               "'Answer:'), 'tail' = the LAST tokens, so 'Answer:' survives; "
                               "'head' = the FIRST tokens, the reference's "
                               "[BOS] + prompt_ids[:max_source_len - 1]", default="tail")
    max_target_len: int = doc("answer tokens kept (label + eos)", default=50)
    seed: int = doc("seed of data order, replay assignment and initialisation", default=42)
    bf16: bool = doc("bf16 mixed precision (fp32 master weights)", default=True)
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory",
                                       default=True)
    reset_optimizer_per_task: bool = doc("fresh AdamW moments at each task (reference: one "
                                         "Trainer per task)", default=True)
    max_steps_per_task: int = doc("stop each task after this many optimizer steps (0 = no cap)",
                                  default=0)
    log_every: int = doc("optimizer steps between logged scalars", default=1)
    max_bad_steps: int = doc("abort after this many non-finite losses in a row", default=5)
    collective_timeout_s: float = doc("a collective waiting longer than this fails the job "
                                      "(a dead rank never hangs the others forever)",
                                      default=1800.0)
    lora: Optional[LoraConfig] = doc("LoRA adapters on a frozen base (docs/lora.md); absent = "
                                     "full fine-tuning", default=None)


@dataclass
class GeneralEvalConfig:
    name: str = doc("name of the general-ability score, e.g. mmlu")
    kind: str = doc("mmlu (lettered multiple choice JSONL) | cloze (answer texts scored as "
                    "continuations, acc_norm reported; JSONL of context/choices/gold) | "
                    "perplexity (text file)")
    path: str = doc("data file")
    shots: int = doc("k-shot examples for mmlu", default=0)
    max_examples: int = doc("cap on examples (0 = all)", default=0)


@dataclass
class EvalConfig:
    enabled: bool = doc("evaluate the base model and the model after each task", default=True)
    mode: str = doc("rank (label log-likelihood) | generate (greedy decoding)", default="rank")
    max_examples: int = doc("cap each test set to a seeded sample of this size (0 = all)",
                            default=0)
    sample_seed: int = doc("seed of that sample; fixed (not train.seed) so that every training "
                           "seed and every strategy scores the same test examples", default=0)
    reuse_base: bool = doc("keep the base model's evaluation next to the teacher cache and reuse "
                           "it in later runs with the same model, test sets and settings",
                           default=False)
    batch_size: int = doc("rows per rank per evaluation forward", default=8)
    max_new_tokens: int = doc("generate mode: tokens to decode", default=8)
    general: list[GeneralEvalConfig] = doc("general-ability evaluations", default_factory=list)


@dataclass
class CheckpointConfig:
    every_steps: int = doc("checkpoint every N optimizer steps within a task (0 = task ends only)",
                           default=0)
    keep_last: int = doc("mid-task checkpoints kept, newest first (>= 1; task-end checkpoints "
                         "are kept; the newest complete checkpoint is never removed)", default=2)
    keep_task_ends: int = doc("task-end checkpoints kept, newest first (0 = all of them; "
                              "eval/evaluate.py --run re-scores only those kept)", default=0)
    export_hf: bool = doc("export a Hugging Face folder after every task", default=False)


@dataclass
class RunConfig:
    model: str = doc("Hugging Face AutoModelForCausalLM folder or hub id (org/name, from the HF "
                     "cache; downloaded unless HF_HUB_OFFLINE=1); the base model = the teacher")
    output_dir: str = doc("run directory: config, teacher cache, checkpoints, logs, metrics")
    tasks: list[TaskConfig] = doc("tasks, trained in this order")
    deepspeed: str = doc("DeepSpeed JSON config, its \"auto\" keys filled from `train`; auto = "
                         "ZeRO-2 when the model's replicated states fit 35 % of a rank's memory on "
                         "one node, else ZeRO-3, else (GPUs) zero3_offload.json "
                         "(ds_configs/zero{2,3}.json on CPU, zero{2,3}_gpu.json on a GPU)", default="auto")
    tokenizer: str = doc("tokenizer folder or hub id (empty = the model's)", default="")
    model_id: str = doc("set by gere-ds: the hub id `model` named (model then holds its local "
                        "snapshot folder); empty for a folder", default="")
    tokenizer_id: str = doc("set by gere-ds: the hub id `tokenizer` named", default="")
    trust_remote_code: bool = doc("allow model code from the model folder", default=False)
    resume: str = doc("auto | never | path to a checkpoint", default="auto")
    replay: ReplayConfig = doc("general sample replay", default_factory=ReplayConfig)
    train: TrainConfig = doc("optimisation", default_factory=TrainConfig)
    eval: EvalConfig = doc("evaluation", default_factory=EvalConfig)
    checkpoint: CheckpointConfig = doc("checkpointing", default_factory=CheckpointConfig)
    report_to: list[str] = doc("where scalars go besides train.log and train_steps.jsonl: "
                               "tensorboard (always written) and optionally wandb",
                               default_factory=lambda: ["tensorboard"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


class _Marks:
    """Line numbers of YAML keys, by dotted path (e.g. 'replay.strategy', 'tasks.0.name'), and
    the file each came from (a key may come from a `base:` file)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[str, int] = {}
        self.files: dict[str, str] = {}

    def _found(self, path: str) -> str | None:
        while path:
            if path in self.lines:
                return path
            path = path.rpartition(".")[0]
        return None

    def line(self, path: str) -> int | None:
        found = self._found(path)
        return self.lines[found] if found is not None else None

    def error(self, path: str, message: str) -> InputError:
        found = self._found(path)
        file = self.files.get(found, self.file) if found is not None else self.file
        return InputError(message, file=file, line=self.line(path), field=path or None)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently, so a pasted block would override an earlier setting unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), line, seen[key])
            seen.setdefault(key, line) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


def _record_marks(node: yaml.Node, path: str, marks: _Marks, file: str | None = None) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            marks.lines[sub] = key_node.start_mark.line + 1
            marks.files[sub] = file or marks.file
            _record_marks(value_node, sub, marks, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}.{i}" if path else str(i)
            marks.lines[sub] = item.start_mark.line + 1
            marks.files[sub] = file or marks.file
            _record_marks(item, sub, marks, file)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _as_number(value: Any) -> Any:
    """PyYAML reads `3e-6` (no dot) as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _finite(value: float, path: str, marks: _Marks) -> float:
    if not math.isfinite(value):  # .nan passes every `<` check; .inf overflows timeouts
        raise marks.error(path, f"must be a finite number, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, path: str, marks: _Marks) -> Any:
    if value is None and _strip_optional(tp) is not tp:  # an optional section left out
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise marks.error(path, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path, marks)
    if origin is dict:  # a free mapping (replay.options): its owner checks the values
        if not isinstance(value, dict):
            raise marks.error(path, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise marks.error(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{path}.{i}", marks) for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):  # float | str (replay.weight)
        value = _as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), path, marks)
        if isinstance(value, str):
            return value
        raise marks.error(path, f"expected a number or a string, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise marks.error(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise marks.error(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        value = _as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise marks.error(path, f"expected a number, got {value!r}")
        return _finite(float(value), path, marks)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise marks.error(path, f"expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: dict[str, Any], path: str, marks: _Marks) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            sub = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else \
                f" (valid keys: {', '.join(fields)})"
            raise marks.error(sub, f"unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], sub, marks)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise marks.error(path, f"missing required key '{sub}'")
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"override {item!r} is not key=value", file="<command line>")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any, marks: _Marks) -> None:
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise InputError(f"no list item {key}", file="<command line>",
                                 field=".".join(keys))
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise InputError(f"no list item {last}", file="<command line>", field=".".join(keys))
        node[int(last)] = value
    else:
        node[last] = value
    marks.lines[".".join(keys)] = 0  # overrides carry no YAML line


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) is
    replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: str, marks: _Marks, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a mapping, its ``base:`` (relative to it) merged underneath."""
    if not Path(path).is_file():
        raise InputError("config file not found", file=path)
    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        _record_marks(node, "", marks, path)  # the dotted name of the key, from its first line
        dotted = [k for k, ln in marks.lines.items()
                  if ln in (err.first, err.line) and k.rpartition(".")[2] == err.key]
        raise InputError(str(err), file=path, line=err.line,
                         field=dotted[0] if dotted else err.key) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", file=path,
                         line=mark.line + 1 if mark else None) from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InputError("the config must be a mapping of keys", file=path)
    base = raw.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        line = next((k.start_mark.line + 1 for k, _ in node.value if k.value == "base"), None)
        if not isinstance(base, str) or not base:
            raise InputError("must name a config file", file=path, line=line, field="base")
        base_path = Path(path).parent / base
        here = (*chain, Path(path).resolve())
        if base_path.resolve() in here:
            cycle = " -> ".join(str(p) for p in (*here, base_path.resolve()))
            raise InputError(f"configs include each other: {cycle}", file=path, line=line,
                             field="base")
        if not base_path.is_file():
            raise InputError(f"base config {base_path} not found", file=path, line=line,
                             field="base")
        merged = _read_yaml(str(base_path), marks, here)
    if node is not None:
        _record_marks(node, "", marks, path)
    return _merge(merged, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (with its ``base:`` chain), apply ``key=value`` overrides,
    validate and return it."""
    path = str(path)
    marks = _Marks(path)
    raw = _read_yaml(path, marks)
    for item in overrides or []:
        keys, value = _parse_override(item)
        try:
            _apply_override(raw, keys, value, marks)
        except (AttributeError, TypeError):
            raise InputError("cannot set this key", file="<command line>",
                             field=".".join(keys)) from None
    try:
        cfg = _build(RunConfig, raw, "", marks)
        validate(cfg, marks)
    except InputError as err:
        if err.line == 0:  # came from an override
            raise InputError(err.detail, file="<command line>", field=err.field) from None
        raise
    return cfg


def _validate_tasks(cfg: RunConfig, marks: _Marks) -> None:
    if not cfg.tasks:
        raise marks.error("tasks", "at least one task is required")
    names = [task.name for task in cfg.tasks]
    for i, task in enumerate(cfg.tasks):
        if not task.name:
            raise marks.error(f"tasks.{i}.name", "empty task name")
        if names.count(task.name) > 1:
            raise marks.error(f"tasks.{i}.name", f"duplicate task name {task.name!r}")
        if not task.labels:
            raise marks.error(f"tasks.{i}.labels", "a task needs its label set")
        if len(set(task.labels)) != len(task.labels):
            raise marks.error(f"tasks.{i}.labels", "labels must be distinct")
        if task.text_field == task.label_field:
            raise marks.error(f"tasks.{i}.label_field", f"the same column as text_field "
                                                        f"({task.text_field!r}): the label would "
                                                        f"be the input")
        both = [x for x in task.test_only_labels if x in task.labels]
        if both:
            raise marks.error(f"tasks.{i}.test_only_labels", f"{both[0]!r} is already in labels")


def _validate_replay(r: ReplayConfig, bf16: bool, marks: _Marks) -> None:
    """The section's common keys here; the strategy name and each strategy's own keys by the
    strategy registry (every strategy checks its settings itself)."""
    # lazy: the launcher-side checks and the CLI load configs without torch until here
    from gere_ds.strategies import check_replay

    if isinstance(r.weight, str) and r.weight != "dy":
        raise marks.error("replay.weight", f"must be a number or 'dy', got {r.weight!r}")
    if isinstance(r.weight, float) and (r.weight < 0 or r.weight != r.weight):
        raise marks.error("replay.weight", f"must be >= 0, got {r.weight!r}")
    if r.reduction not in REDUCTIONS:
        close = difflib.get_close_matches(r.reduction, REDUCTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise marks.error("replay.reduction", f"unknown reduction {r.reduction!r}{hint}; one of "
                                              f"{', '.join(REDUCTIONS)}")
    for key in ("num_samples", "max_len", "teacher_batch_size"):
        if getattr(r, key) < 1:
            raise marks.error(f"replay.{key}", "must be >= 1")
    if r.per_batch < 0:
        raise marks.error("replay.per_batch", "must be >= 0")
    try:
        check_replay(r, bf16)
    except InputError as err:
        raise marks.error(err.field or "replay", err.detail) from None


def validate(cfg: RunConfig, marks: _Marks | None = None) -> None:
    """Value checks that types alone cannot express."""
    marks = marks or _Marks("<config>")
    t = cfg.train
    _validate_tasks(cfg, marks)
    _validate_replay(cfg.replay, t.bf16, marks)
    for key in ("epochs", "micro_batch_size", "grad_accum", "max_source_len", "max_target_len",
                "log_every"):
        if getattr(t, key) < 1:
            raise marks.error(f"train.{key}", "must be >= 1")
    if t.lr <= 0:
        raise marks.error("train.lr", "must be > 0")
    if not cfg.output_dir.strip():
        raise marks.error("output_dir", "empty (it would be the current directory); name the "
                                        "run's folder")
    for key, low in (("max_bad_steps", 1), ("warmup_steps", 0), ("max_steps_per_task", 0)):
        if getattr(t, key) < low:
            raise marks.error(f"train.{key}", f"must be >= {low}")
    for key in ("min_lr_ratio", "grad_clip", "weight_decay"):
        if getattr(t, key) < 0:
            raise marks.error(f"train.{key}", "must be >= 0")
    if t.min_lr_ratio > 1:
        raise marks.error("train.min_lr_ratio", "must be at most 1")
    if not t.collective_timeout_s > 0:
        raise marks.error("train.collective_timeout_s", "must be > 0 (seconds)")
    for key, low in (("batch_size", 1), ("max_new_tokens", 1), ("max_examples", 0)):
        if getattr(cfg.eval, key) < low:
            raise marks.error(f"eval.{key}", f"must be >= {low}")
    for i, g in enumerate(cfg.eval.general):
        for key in ("shots", "max_examples"):
            if getattr(g, key) < 0:
                raise marks.error(f"eval.general.{i}.{key}", "must be >= 0")
    if t.truncate_source not in TRUNCATE_SOURCE:
        close = difflib.get_close_matches(t.truncate_source, TRUNCATE_SOURCE, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise marks.error("train.truncate_source", f"unknown value {t.truncate_source!r}{hint}; "
                                                   f"one of {', '.join(TRUNCATE_SOURCE)}")
    if cfg.eval.mode not in EVAL_MODES:
        raise marks.error("eval.mode", f"must be one of {', '.join(EVAL_MODES)}")
    if cfg.resume not in ("auto", "never") and not cfg.resume:
        raise marks.error("resume", "auto | never | a checkpoint path")
    for key in ("every_steps", "keep_task_ends"):
        if getattr(cfg.checkpoint, key) < 0:
            raise marks.error(f"checkpoint.{key}", "must be >= 0")
    if cfg.checkpoint.keep_last < 1:  # 0 would prune the checkpoint just written
        raise marks.error("checkpoint.keep_last", "must be >= 1 (the newest checkpoint is what a "
                                                  "resume loads)")
    for i, name in enumerate(cfg.report_to):
        if name not in ("tensorboard", "wandb"):
            raise marks.error(f"report_to.{i}", f"unknown reporter {name!r}; one of "
                                                f"tensorboard, wandb")
    if t.lora is not None:
        _validate_lora(t, marks)


def _validate_lora(t: TrainConfig, marks: _Marks) -> None:
    lora = t.lora
    if lora.r <= 0:
        raise marks.error("train.lora.r", f"must be > 0, got {lora.r}")
    if not lora.alpha > 0:
        raise marks.error("train.lora.alpha", f"must be > 0, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise marks.error("train.lora.dropout", f"must be in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules or any(not name for name in lora.target_modules):
        raise marks.error("train.lora.target_modules", "name at least one linear layer, e.g. "
                                                       "[q_proj, v_proj]")
    if lora.continual not in LORA_CONTINUAL:
        raise marks.error("train.lora.continual",
                          f"choose carry (one adapter through the sequence) or merge (merged "
                          f"into the base after each task), got {lora.continual!r}; "
                          f"see docs/lora.md")
    if lora.continual == "merge" and not t.reset_optimizer_per_task:
        raise marks.error("train.reset_optimizer_per_task",
                          "lora.continual=merge starts a fresh adapter at every task, so the "
                          "Adam moments of the merged one belong to nothing: set it to true")


def save_resolved(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

