"""Hugging Face export: a ZeRO-3 checkpoint (or a live engine) -> a `save_pretrained` folder.

Two ways in, one way out:

* ``export_checkpoint(run_dir, out, task=..., tag=...)`` (``launch/export.py``): one plain process
  reads DeepSpeed's per-rank files with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``
  (the fp32 master weights, any number of ranks), builds the model from the model folder's
  config on the meta device (no weights are loaded) and writes safetensors + the tokenizer.
* ``export_from_engine(engine_module, tokenizer, out)`` (in a run, on ALL ranks): gathers the
  parameters one module at a time with ``deepspeed.zero.GatheredParameters`` (never the whole
  model on one rank at once on the GPU); rank 0 keeps CPU copies and writes. Only rank 0 touches
  the disk, so no shared filesystem is needed.

Both write into a hidden temp folder next to the destination, check the result with
``verify_export`` (every tensor the model config implies is there, with its shape, not empty --
the near-empty-weights failure of ZeRO-3 saves), and only then rename it into place. An existing
destination is replaced only with ``force``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gere_ds import dist
from gere_ds.checkpoint import rank_problem, task_tag
from gere_ds.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
EXPORT_INFO = "export_info.json"
_TASK_END = re.compile(r"^task(\d{3,})-end$")


class ExportError(InputError):
    """An export that cannot be made or that failed its check; str() is one line."""


# ---------------------------------------------------------------------------- helpers
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


def _meta_model(config: Any, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model a config implies, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with plain_model_building(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
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
        aliases = _tied_aliases(model)
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


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ---------------------------------------------------------------------------- verification
def inspect_export(folder: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """`verify_export` that also returns a summary: parameters, tensors, dtypes."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError("not a Hugging Face folder (config.json missing)", file=str(folder))
    saved = _read_saved_shapes(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        model = _meta_model(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"cannot build the model from config.json "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                          file=str(folder / "config.json")) from None
    expected = _expected_on_disk(model)
    full_sd = model.state_dict()
    aliases = _tied_aliases(model)  # tied names save_pretrained drops, tolerated if present
    where = str(folder)
    for name, shape in expected.items():
        if name not in saved:
            raise ExportError(f"tensor {name} missing (expected shape {_fmt(shape)})", file=where)
        got = saved[name][0]
        if tuple(got) != tuple(shape):
            empty = " - empty weights, the ZeRO-3 partition placeholder" if 0 in got else ""
            raise ExportError(f"tensor {name} has shape {_fmt(got)}, expected {_fmt(shape)}"
                              f"{empty}", file=where)
    for name, (got, _) in saved.items():
        if name in expected:
            continue
        if name in aliases and name in full_sd and tuple(got) == tuple(full_sd[name].shape):
            continue
        raise ExportError(f"unexpected tensor {name} with shape {_fmt(got)} (not implied by "
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


# ---------------------------------------------------------------------------- writing
def _temp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.export-tmp-{os.getpid()}"


def check_destination(out: str | Path, force: bool) -> None:
    """Refuse an existing, non-empty destination unless force (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError("destination exists and is not a folder", file=str(out))
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError("destination folder exists; pass --force to replace it", file=str(out))


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a verified temp folder into place (an existing DIR only with force)."""
    check_destination(out, force)
    if out.is_dir():
        old = out.parent / f".{out.name}.export-old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    key = "dtype" if "dtype" in data or "torch_dtype" not in data else "torch_dtype"
    if data.get(key) != name:
        data[key] = name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _finish(tmp: Path, out: Path, force: bool, info: dict[str, Any],
            trust_remote_code: bool) -> dict[str, Any]:
    summary = inspect_export(tmp, trust_remote_code)
    info = {**info, **summary}
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    _publish(tmp, out, force)
    return info


def _cast_state_dict(sd: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Materialise (DeepSpeed lazy tensors) and cast floating tensors; shared tensors stay shared
    (so save_pretrained still sees tied weights as one)."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name in list(sd):
        t = sd[name]
        if id(t) not in done:
            x = t.contiguous()
            if x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            done[id(t)] = x
        out[name] = done[id(t)]
        sd[name] = None  # let the lazy source go as we move on
    return out


# ---------------------------------------------------------------------------- from a checkpoint
def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be exported (None: complete and intact for EVERY rank).

    Mirrors gere_ds.checkpoint's markers: ``COMPLETE.rank<r>`` per rank, each listing that rank's
    files and sizes; the rank count comes from rank 0's ``trainer_state.json``. A plain
    ``COMPLETE`` file (the earlier single-marker layout) is accepted too.
    """
    folder = Path(folder)
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        return "incomplete: no trainer_state.json"
    rank_markers = sorted(folder.glob("COMPLETE.rank*"))
    if not rank_markers:
        return None if (folder / "COMPLETE").is_file() else "incomplete: no COMPLETE marker"
    try:
        world = int(json.loads(state_path.read_text()).get("world_size") or len(rank_markers))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        return "unreadable trainer_state.json"
    for r in range(world):
        problem = rank_problem(folder, r)
        if problem and problem.startswith("no completion marker"):
            return (f"incomplete: no COMPLETE marker of rank {r} of {world} (without a shared "
                    f"disk, copy every node's files of this checkpoint into one folder first)")
        if problem:
            return problem if "truncated" in problem else f"incomplete: {problem}"
    return None


def find_checkpoint(run_dir: str | Path, task: int | None = None, tag: str | None = None,
                    log: Callable[[str], None] = print) -> tuple[Path, str]:
    """(checkpoints root, tag) to export; refuses a checkpoint without its COMPLETE marker.

    Default: the end-of-task checkpoint of the last completed task (an incomplete newer one is
    skipped with a log line); ``task`` (1-based): the end of that task; ``tag``: explicit.
    """
    root = Path(run_dir) / "checkpoints"
    if task is not None and tag is not None:
        raise ExportError("give --task or --tag, not both", field="task")
    if not root.is_dir():
        raise ExportError("no checkpoints folder in the run directory", file=str(root))
    if task is not None:
        if task < 1:
            raise ExportError(f"task numbers start at 1, got {task}", field="task")
        tag = task_tag(task - 1)
    if tag is not None:
        folder = root / tag
        if not folder.is_dir():
            ends = sorted(p.name for p in root.iterdir() if _TASK_END.match(p.name))
            raise ExportError(f"no checkpoint {tag!r} (task-end checkpoints here: "
                              f"{', '.join(ends) or 'none'})", file=str(root))
        problem = checkpoint_problem(folder)
        if problem:
            raise ExportError(f"refusing to export this checkpoint: {problem}", file=str(folder))
        return root, tag
    ends = sorted((int(m.group(1)), p.name) for p in root.iterdir()
                  if p.is_dir() and (m := _TASK_END.match(p.name)))
    for _, name in reversed(ends):
        problem = checkpoint_problem(root / name)
        if problem is None:
            return root, name
        log(f"skipping checkpoint {root / name}: {problem}")
    raise ExportError("no complete end-of-task checkpoint to export", file=str(root))


def export_checkpoint(run_dir: str | Path, out: str | Path, task: int | None = None,
                      tag: str | None = None, dtype: str | torch.dtype | None = None,
                      force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Consolidate a run's ZeRO checkpoint into an HF folder at ``out``; returns export_info.

    The model is built from ``<model>/config.json`` of the run's resolved config
    (``<run_dir>/config.yaml``) on the meta device; the tokenizer from ``tokenizer`` or ``model``.
    ``dtype`` None: the dtype of the original model config.
    """
    from transformers import AutoConfig

    from gere_ds.config import load_config
    from gere_ds.engine import check_model_folder, load_tokenizer

    run_dir, out = Path(run_dir), Path(out).absolute()
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError("not a run directory (config.yaml missing)", file=str(run_dir))
    cfg = load_config(cfg_path)
    root, tag = find_checkpoint(run_dir, task, tag, log)
    check_destination(out, force)
    check_model_folder(cfg)
    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    target = resolve_dtype(dtype, default=config_dtype(config))
    tokenizer = load_tokenizer(cfg, log)
    log(f"export: reading {root / tag}")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    except Exception as err:  # noqa: BLE001 - truncated / foreign checkpoint files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"cannot read the ZeRO checkpoint ({first})",
                          file=str(root / tag)) from None
    model = _meta_model(config, dtype=target, trust_remote_code=cfg.trust_remote_code)
    _check_against_model(lazy, model, str(root / tag))
    try:
        from transformers import GenerationConfig

        if (Path(cfg.model) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(cfg.model)
    except Exception:  # noqa: BLE001 - keep the one from_config made
        pass
    sd = _cast_state_dict(lazy, target)
    tmp = _temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        del sd
        tokenizer.save_pretrained(str(tmp))
        _set_config_dtype(tmp, target)
        info = _finish(tmp, out, force, {
            "source": str((root / tag).absolute()), "tag": tag, "run_dir": str(run_dir.absolute()),
            "dtype": str(target).removeprefix("torch."), "via": "zero_to_fp32"},
            cfg.trust_remote_code)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"export: wrote {out} ({info['parameters']:,} parameters, {info['tensors']} tensors, "
        f"{info['dtype']}) from {tag}")
    return info


def _check_against_model(sd: dict[str, Any], model: torch.nn.Module, where: str) -> None:
    """Checkpoint names/shapes == the model the config implies (before anything is written)."""
    expected = model.state_dict()
    aliases = _tied_aliases(model)
    for name, t in expected.items():
        if name not in sd:
            if name in aliases and aliases[name] in sd:
                continue
            raise ExportError(f"checkpoint lacks tensor {name} (shape {_fmt(t.shape)}) that "
                              f"the model config implies", file=where)
        got = tuple(sd[name].shape)
        if got != tuple(t.shape):
            raise ExportError(f"checkpoint tensor {name} has shape {_fmt(got)}, the model config "
                              f"implies {_fmt(t.shape)}", file=where)
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ExportError(f"checkpoint tensor {extra[0]} is not in the model the config "
                          f"implies ({len(extra)} such)", file=where)


# ---------------------------------------------------------------------------- from a live engine
def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        skip = getattr(m, "_non_persistent_buffers_set", set())
        for name, buf in m._buffers.items():
            if buf is not None and name not in skip:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def export_from_engine(engine_module: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
                       dtype: str | torch.dtype | None = None, force: bool = True,
                       trust_remote_code: bool = False,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the engine's current weights as an HF folder. Call on ALL ranks (a collective).

    Parameters are gathered one module at a time (``GatheredParameters(..., modifier_rank=None)``);
    rank 0 keeps CPU copies (checked against the ZeRO-3 ``ds_shape``), writes with
    ``engine_module.save_pretrained(tmp, state_dict=...)`` + the tokenizer, verifies and renames
    into ``out_dir``. Other ranks write nothing (no shared filesystem needed). ``dtype`` None:
    the parameters' own dtype (bf16 when training in bf16: the weights the engine computes with,
    not the fp32 master copy). ``force`` (default True here: the run owns the folder) replaces an
    existing folder. The saved config has ``use_cache: true``. Every rank gets the same
    ExportError if rank 0 fails; returns export_info on every rank (rank 0's).
    """
    import deepspeed

    out = Path(out_dir).absolute()
    main = dist.is_main()
    target = resolve_dtype(dtype) if dtype is not None else None
    early: str | None = None
    if main:  # refuse before the (long) gathering, on every rank alike
        try:
            check_destination(out, force)
        except ExportError as e:
            early = str(e)
    early = dist.broadcast_object(early)
    if early:
        raise ExportError(early)
    names: dict[int, list[str]] = {}
    for name, p in engine_module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    sd: dict[str, torch.Tensor] = {}
    bad: str | None = None
    seen: set[int] = set()
    for module in engine_module.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if main:
                for p in params:
                    want = tuple(getattr(p, "ds_shape", p.shape))
                    t = p.detach().to(device="cpu", dtype=target or p.dtype, copy=True)
                    if tuple(t.shape) != want or (t.numel() == 0 and 0 not in want):
                        bad = bad or (f"gathered {names[id(p)][0]} has shape {_fmt(t.shape)}, "
                                      f"expected {_fmt(want)}")
                    for n in names[id(p)]:
                        sd[n] = t
    info: dict[str, Any] = {}
    err: str | None = None
    if main:
        tmp = _temp_dir(out)
        try:
            if bad:
                raise ExportError(bad, file=str(out))
            for name, buf in _persistent_buffers(engine_module).items():
                x = buf.detach().to("cpu", copy=True)
                sd[name] = x.to(target) if target is not None and x.is_floating_point() else x
            check_destination(out, force)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            config = engine_module.config
            use_cache = getattr(config, "use_cache", None)
            try:
                if use_cache is False:
                    config.use_cache = True  # the trainer turns it off for training only
                with plain_model_building():
                    engine_module.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            finally:
                if use_cache is False:
                    config.use_cache = False
            sd.clear()
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            saved_dtype = target or next(p.dtype for p in engine_module.parameters()
                                         if p.is_floating_point())
            _set_config_dtype(tmp, saved_dtype)
            info = _finish(tmp, out, force, {"dtype": str(saved_dtype).removeprefix("torch."),
                                             "via": "engine", "world_size": dist.world_size()},
                           trust_remote_code)
            if log:
                log(f"export: wrote {out} ({info['parameters']:,} parameters, "
                    f"{info['tensors']} tensors, {info['dtype']})")
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, InputError):
                err = f"{out}: export failed: {type(e).__name__}: {err}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    err, info = dist.broadcast_object((err, info))
    if err:
        raise ExportError(err)
    return info
