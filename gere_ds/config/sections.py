"""The run config's sections: typed, documented dataclasses, one per YAML section.

Every knob of a run lives here with a one-line doc (``metadata["doc"]``); reading them from YAML
is :mod:`gere_ds.config.loading`, the checks types cannot express :mod:`gere_ds.config.checks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

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
    micro_batch_size: Union[int, str] = doc(
        "rows per rank per forward, or 'auto': the trainer splits each rank's grad_accum rows "
        "per step into the largest micro-batches whose activations fit its memory (the per-row "
        "loss gives every split the same gradient; needs replay.reduction: row)", default=1)
    grad_accum: int = doc("micro-steps per optimizer step (with micro_batch_size: auto, the "
                          "rows per rank per optimizer step)", default=66)
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
    packing: bool = doc("lay each micro-batch's rows end to end (positions restart per row, "
                        "attention stays within a row) instead of padding them to the longest: "
                        "the same per-row losses, no compute spent on padding", default=False)
    chunked_ce: bool = doc("run the LM head and its cross-entropy in chunks of positions, "
                           "keeping no [positions, vocabulary] logits (gere_ds/training/"
                           "linear_ce.py): the same CE, peak memory of one chunk",
                           default=False)
    pack_length: int = doc("tokens per packed sequence (0 = the model's context length); "
                           "a micro-batch that does not fit runs as several", default=0)
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
