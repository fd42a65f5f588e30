"""Tokenization: task examples with label masking, replay texts without BOS."""
from __future__ import annotations

from dataclasses import dataclass

from gere_ds.constants import TRUNCATE_SOURCE
from gere_ds.data.prompts import build_prompt

IGNORE = -100


@dataclass
class Encoded:
    """One training row: token ids and the CE targets (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode_source(tokenizer, prompt: str, max_source_len: int, truncate: str = "tail") -> list[int]:
    """Prompt ids with the tokenizer's special tokens (BOS if it adds one), at most max_source_len.

    A too-long prompt keeps the tokenizer's special prefix/suffix (BOS) and, of the prompt's own
    tokens (the WHOLE prompt: instruction, `Option:` line, text and "Answer:"), with
    ``truncate="tail"`` its LAST ones (the instruction of a long passage may be cut, but
    "Answer:", which the label follows, always survives) or with ``"head"`` its FIRST ones (the
    reference: ``[BOS] + prompt_ids[:max_source_len - 1]``; the end of the text and "Answer:"
    are lost).
    """
    if truncate not in TRUNCATE_SOURCE:
        raise ValueError(f"truncate must be one of {', '.join(TRUNCATE_SOURCE)}, got {truncate!r}")
    full = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(full) <= max_source_len:
        return full
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for off in range(len(full) - len(plain) + 1):
        if full[off:off + len(plain)] == plain:
            prefix, suffix = full[:off], full[off + len(plain):]
            keep = max_source_len - len(prefix) - len(suffix)
            if keep >= 1:
                kept = plain[:keep] if truncate == "head" else plain[len(plain) - keep:]
                return prefix + kept + suffix
            break
    return full[:max_source_len] if truncate == "head" else full[len(full) - max_source_len:]


def encode_target(tokenizer, label: str, max_target_len: int) -> list[int]:
    """Label ids without special tokens, cut to leave room for the eos that always ends them."""
    ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    return ids[: max(max_target_len - 1, 0)] + [tokenizer.eos_token_id]


def encode_example(tokenizer, instruction: str, labels: list[str], text: str, label: str,
                   max_source_len: int, max_target_len: int, *, truncate_source: str = "tail",
                   option_line: bool = True) -> Encoded:
    """prompt + target; CE only on the target tokens.

    ``truncate_source`` is ``train.truncate_source`` (:func:`encode_source`), ``option_line`` the
    task's ``option_line`` (:func:`~gere_ds.data.prompts.build_prompt`).
    """
    src = encode_source(tokenizer, build_prompt(instruction, labels, text, option_line),
                        max_source_len, truncate_source)
    tgt = encode_target(tokenizer, label, max_target_len)
    return Encoded(src + tgt, [IGNORE] * len(src) + tgt)


def encode_replay(tokenizer, text: str, max_len: int) -> list[int]:
    """Replay text ids WITHOUT BOS (reference behaviour), cut to max_len tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
