"""The prompt format of the continual benchmark (docs/method.md, 'Tasks, prompts and metrics');
the target is the label itself, ended by the tokenizer's eos id (data/encode.encode_target)."""
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
