"""`model` / `tokenizer` as a local folder or a Hugging Face hub id, resolved through the standard
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE`` respected).

The id is resolved once, at the input checks, into the snapshot folder of the cache, so every
later reader of ``cfg.model`` (teacher fingerprint, export, evaluation) sees a local folder; the id
itself is kept in ``cfg.model_id`` / ``cfg.tokenizer_id`` and written to the run's config.yaml.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError

# owner/name as the hub spells repository ids (a relative path with one slash looks the same:
# an existing folder always wins)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# never fetched: original checkpoints, other frameworks' weights, quantised copies
IGNORE = ["original/*", "*.pth", "*.gguf", "*.msgpack", "*.h5", "*.ot", "*.onnx", "onnx/*",
          "flax_model*", "tf_model*", "rust_model*"]
TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), read now, not at import."""
    return any(os.environ.get(k, "").strip().lower() in TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> str:
    """The hub cache folder, from the environment as huggingface_hub reads it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def resolve_source(name: str, field: str) -> str:
    """A local folder for ``name``: the folder itself, or the cached (else downloaded, unless
    offline) snapshot of a hub id. Anything else is returned as is for the folder checks."""
    if not name or not looks_like_hub_id(name):
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    try:
        return str(snapshot_download(name, cache_dir=hub_cache(), local_files_only=offline,
                                     ignore_patterns=IGNORE))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise InputError(f"{name!r} is not a local folder and not in the Hugging Face cache "
                         f"({hub_cache()}; {why}); fetch it with `hf download "
                         f"{name}` or run with HF_HUB_OFFLINE=0", field=field) from None
    except Exception as err:  # repository not found, gated, HTTP errors: one line, not a trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{name!r} is not a local folder and the hub did not provide it "
                         f"({type(err).__name__}: {first})", field=field) from None


def resolve_model_sources(cfg: RunConfig) -> None:
    """Replace hub ids in ``cfg.model`` / ``cfg.tokenizer`` by their local folders, keeping the
    ids in ``model_id`` / ``tokenizer_id`` (idempotent: a resolved config stays as it is)."""
    for field, id_field in (("model", "model_id"), ("tokenizer", "tokenizer_id")):
        name = getattr(cfg, field)
        folder = resolve_source(name, field)
        if folder != name:
            setattr(cfg, id_field, name)
            setattr(cfg, field, folder)
