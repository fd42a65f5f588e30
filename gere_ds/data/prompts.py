"""The prompt and target format of the continual benchmark (method.md, 'Task format')."""
from __future__ import annotations


def build_prompt(instruction: str, labels: list[str], text: str) -> str:
    """`{instruction}\\nOption: {labels, comma-separated}\\n{text}\\nAnswer:`."""
    return f"{instruction}\nOption: {', '.join(labels)}\n{text}\nAnswer:"


def build_target(label: str) -> str:
    """The answer text; the tokenizer's eos id is appended after tokenization."""
    return label
