"""A Hugging Face model folder: the model skeleton on the meta device, the tensors a folder
holds, and the check that an export has every tensor its config implies, with its shape."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from gere_ds.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ExportError(InputError):
    """An export that cannot be made or that failed its check; str() is one line."""


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32
                  ) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 / None (-> default) -> a torch dtype."""
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; one of float32, bfloat16, float16",
                          field="dtype")
    return DTYPES[name]


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a model config declares (``dtype`` / ``torch_dtype``); float32 when absent."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        return resolve_dtype(value)
    except ExportError:
        return torch.float32


@contextlib.contextmanager
def plain_model_building() -> Iterator[None]:
    """Build models without ZeRO-3 partitioning even while an HfDeepSpeedConfig is alive.

    transformers partitions every from_config/from_pretrained once an HfDeepSpeedConfig exists
    (a weakref global). `unset_hf_deepspeed_config()` would drop it for the rest of the run, so
    the reference is saved and restored instead.
    """
    try:
        import transformers.integrations.deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def meta_model(config: Any, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model a config implies, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with plain_model_building(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias name: first name} for every parameter/buffer that appears under several names."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _expected_on_disk(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Names and shapes `save_pretrained` writes for this (meta) model: its state dict without
    tied aliases, in the on-disk layout (transformers 5 may convert weights, e.g. MoE experts)."""
    sd = model.state_dict()
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        sd = remove_tied_weights_from_state_dict(dict(sd), model)
    except Exception:  # noqa: BLE001 - older transformers: drop aliases ourselves
        aliases = tied_aliases(model)
        sd = {k: v for k, v in sd.items() if k not in aliases}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        sd = revert_weight_conversion(model, dict(sd))
    except Exception:  # noqa: BLE001 - no conversion machinery: names are the module names
        pass
    return {name: t.shape for name, t in sd.items()}


def _read_saved_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} of a folder's safetensors, without reading the data."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ExportError(f"unreadable safetensors index ({err})", file=str(index)) from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ExportError("no safetensors weights (model.safetensors or its index)",
                          file=str(folder))
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise ExportError("weight file named by the index is missing", file=str(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    sl = f.get_slice(key)
                    shapes[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
                    if weight_map is not None and weight_map.get(key) != fname:
                        raise ExportError(f"tensor {key} is in {fname} but the index says "
                                          f"{weight_map.get(key)}", file=str(index))
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated / corrupt file
            raise ExportError(f"unreadable safetensors file ({str(err).splitlines()[0]})",
                              file=str(path)) from None
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in shapes:
                raise ExportError(f"tensor {key} listed in the index is not in {fname}",
                                  file=str(index))
    return shapes


def fmt_shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def inspect_export(folder: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """`verify_export` that also returns a summary: parameters, tensors, dtypes."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError("not a Hugging Face folder (config.json missing)", file=str(folder))
    saved = _read_saved_shapes(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        model = meta_model(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"cannot build the model from config.json "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                          file=str(folder / "config.json")) from None
    expected = _expected_on_disk(model)
    full_sd = model.state_dict()
    aliases = tied_aliases(model)  # tied names save_pretrained drops, tolerated if present
    where = str(folder)
    for name, shape in expected.items():
        if name not in saved:
            raise ExportError(f"tensor {name} missing (expected shape {fmt_shape(shape)})", file=where)
        got = saved[name][0]
        if tuple(got) != tuple(shape):
            empty = " - empty weights, the ZeRO-3 partition placeholder" if 0 in got else ""
            raise ExportError(f"tensor {name} has shape {fmt_shape(got)}, expected {fmt_shape(shape)}"
                              f"{empty}", file=where)
    for name, (got, _) in saved.items():
        if name in expected:
            continue
        if name in aliases and name in full_sd and tuple(got) == tuple(full_sd[name].shape):
            continue
        raise ExportError(f"unexpected tensor {name} with shape {fmt_shape(got)} (not implied by "
                          f"config.json)", file=where)
    n_expected = sum(int(torch.Size(s).numel()) for s in expected.values())
    n_saved = sum(int(torch.Size(saved[k][0]).numel()) for k in expected)
    n_params = int(sum(p.numel() for p in model.parameters()))  # tied counted once
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    n_buffers = int(sum(t.numel() for k, t in full_sd.items()
                        if k not in param_names and k not in aliases))
    if n_saved != n_expected or (n_params + n_buffers != n_expected
                                 and set(expected) <= set(full_sd)):
        raise ExportError(f"parameter count {n_saved} != {n_expected} implied by config.json "
                          f"({n_params} parameters, tied embeddings counted once)", file=where)
    return {"parameters": n_params, "tensors": len(expected),
            "dtypes": sorted({saved[k][1] for k in expected})}


def verify_export(folder: str | Path, trust_remote_code: bool = False) -> None:
    """Check an HF folder against its config.json; ExportError names the first bad tensor.

    Every tensor the config implies must be in the safetensors (single file or sharded), with
    its shape and not empty; nothing else may be there (tied aliases are tolerated); the total
    element count must equal a model built from the config (tied embeddings counted once).
    Only the safetensors headers are read, so this is cheap for an 8B model.
    """
    inspect_export(folder, trust_remote_code)
