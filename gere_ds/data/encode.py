"""Tokenization: task examples with label masking, replay texts without BOS."""
from __future__ import annotations

from dataclasses import dataclass

from gere_ds.data.prompts import build_prompt, build_target

IGNORE = -100


@dataclass
class Encoded:
    """One training row: token ids and the CE targets (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode_source(tokenizer, prompt: str, max_source_len: int) -> list[int]:
    """Prompt ids with the tokenizer's special tokens (BOS if it adds one).

    Too-long prompts keep their END and the tokenizer's special prefix/suffix: the instruction of
    a long passage may be cut, but "Answer:", which the label follows, always survives.
    """
    full = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(full) <= max_source_len:
        return full
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for off in range(len(full) - len(plain) + 1):
        if full[off:off + len(plain)] == plain:
            prefix, suffix = full[:off], full[off + len(plain):]
            keep = max_source_len - len(prefix) - len(suffix)
            if keep >= 1:
                return prefix + plain[len(plain) - keep:] + suffix
            break
    return full[len(full) - max_source_len:]


def encode_target(tokenizer, label: str, max_target_len: int) -> list[int]:
    """Label ids without special tokens, cut to leave room for the eos that always ends them."""
    ids = tokenizer(build_target(label), add_special_tokens=False)["input_ids"]
    return ids[: max(max_target_len - 1, 0)] + [tokenizer.eos_token_id]


def encode_example(tokenizer, instruction: str, labels: list[str], text: str, label: str,
                   max_source_len: int, max_target_len: int) -> Encoded:
    """prompt + target; CE only on the target tokens."""
    src = encode_source(tokenizer, build_prompt(instruction, labels, text), max_source_len)
    tgt = encode_target(tokenizer, label, max_target_len)
    return Encoded(src + tgt, [IGNORE] * len(src) + tgt)


def encode_replay(tokenizer, text: str, max_len: int) -> list[int]:
    """Replay text ids WITHOUT BOS (reference behaviour), cut to max_len tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
