"""The prompt and target format of the continual benchmark (docs/method.md, 'Tasks, prompts and metrics')."""
from __future__ import annotations


def build_prompt(instruction: str, labels: list[str], text: str,
                 option_line: bool = True) -> str:
    """`{instruction}\\nOption: {labels, comma-separated}\\n{text}\\nAnswer:`.

    An empty instruction has no line of its own and ``option_line=False`` drops the `Option:`
    line: O-LoRA's COPA prompt, whose text names its choices, is just `{text}\\nAnswer:`.
    """
    lines = [instruction] if instruction else []
    if option_line:
        lines.append(f"Option: {', '.join(labels)}")
    return "\n".join(lines + [text, "Answer:"])


def build_target(label: str) -> str:
    """The answer text; the tokenizer's eos id is appended after tokenization."""
    return label
