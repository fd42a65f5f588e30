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

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from gere_ds.runtime import dist, stop
from gere_ds.checkpointing.checkpoint import Checkpointer, all_ranks_problem, run_identity, task_tag
from gere_ds.config.loading import load_config
from gere_ds.model.engine import check_model_folder, load_tokenizer
from gere_ds.errors import InputError
from gere_ds.model.hf_folder import (DTYPES, ExportError, config_dtype, fmt_shape,  # noqa: F401
                               inspect_export, meta_model, plain_model_building, tied_aliases,
                               resolve_dtype, verify_export)
from gere_ds.model.lora_export import lora_export_parts, model_from_checkpoint
from gere_ds.storage.owners import owner_tag, stale

EXPORT_INFO = "export_info.json"


# ---------------------------------------------------------------------------- writing
# ``.<name>.export-tmp-<pid>@<host>`` (and ``-old-``): the prefix before the owner tag
_TEMP = re.compile(r"^(\..+\.export-(?:tmp|old)-)\d+@")


def _temp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.export-tmp-{owner_tag()}"


def clean_stale_temps(folder: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temp folders that exports killed mid-way left in ``folder`` (a full model
    each): only those of this host whose process is gone, never a live export's."""
    gone = []
    for path in Path(folder).glob(".*.export-*") if Path(folder).is_dir() else []:
        m = _TEMP.match(path.name)
        if m is not None and path.is_dir() and stale(path.name, m.group(1)):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    if gone and log:
        log(f"export: removed {len(gone)} stale temporary folder(s) of dead exports in {folder}")
    return gone


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
        old = out.parent / f".{out.name}.export-old-{owner_tag()}"
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
def _run_of(run_dir: Path) -> str | None:
    """The run fingerprint of the run directory's config.yaml (None: no readable config)."""
    try:
        return run_identity(load_config(Path(run_dir) / "config.yaml"))
    except InputError:
        return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be exported (None: complete for EVERY rank, written by the
    run of ``<run_dir>/config.yaml``); sizes only, the export itself checks the checksums."""
    folder = Path(folder)
    return all_ranks_problem(folder, _run_of(folder.parent.parent))


def find_checkpoint(run_dir: str | Path, task: int | None = None, tag: str | None = None,
                    log: Callable[[str], None] = print) -> tuple[Path, str]:
    """(checkpoints root, tag) to export; refuses a checkpoint that is incomplete, fails its
    checksums or was written by another run than ``<run_dir>/config.yaml``'s (before any file
    of it is unpickled).

    Default: the end-of-task checkpoint of the last completed task (an incomplete newer one is
    skipped with a log line); ``task`` (1-based): the end of that task; ``tag``: explicit.
    """
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", run=_run_of(Path(run_dir)) or "?")
    if task is not None and tag is not None:
        raise ExportError("give --task or --tag, not both", field="task")
    if not ckpt.root.is_dir():
        raise ExportError("no checkpoints folder in the run directory", file=str(ckpt.root))
    if task is not None:
        if task < 1:
            raise ExportError(f"task numbers start at 1, got {task}", field="task")
        tag = task_tag(task - 1)
    if tag is not None:
        if not (ckpt.root / tag).is_dir():
            raise ExportError(f"no checkpoint {tag!r} (task-end checkpoints here: "
                              f"{', '.join(ckpt.task_ends()) or 'none'})", file=str(ckpt.root))
        problem = ckpt.verify(tag)
        if problem:
            raise ExportError(f"refusing to export this checkpoint: {problem}",
                              file=str(ckpt.root / tag))
        return ckpt.root, tag
    for name in reversed(ckpt.task_ends()):
        problem = ckpt.verify(name)
        if problem is None:
            return ckpt.root, name
        log(f"skipping checkpoint {ckpt.root / name}: {problem}")
    raise ExportError("no complete end-of-task checkpoint to export", file=str(ckpt.root))


def _read_zero_checkpoint(root: Path, tag: str) -> dict[str, Any]:
    """The fp32 master weights of every rank, lazily, with DeepSpeed's own reader."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    except Exception as err:  # noqa: BLE001 - truncated / foreign checkpoint files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"cannot read the ZeRO checkpoint ({first})",
                          file=str(root / tag)) from None


def _copy_generation_config(model: torch.nn.Module, model_dir: str) -> None:
    try:
        from transformers import GenerationConfig

        if (Path(model_dir) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - keep the one from_config made
        pass


def export_checkpoint(run_dir: str | Path, out: str | Path, task: int | None = None,
                      tag: str | None = None, dtype: str | torch.dtype | None = None,
                      force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Consolidate a run's ZeRO checkpoint into an HF folder at ``out``; returns export_info.

    The model is built from ``<model>/config.json`` of the run's resolved config
    (``<run_dir>/config.yaml``) on the meta device; the tokenizer from ``tokenizer`` or ``model``.
    ``dtype`` None: the dtype of the original model config.
    """
    from transformers import AutoConfig


    run_dir, out = Path(run_dir), Path(out).absolute()
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError("not a run directory (config.yaml missing)", file=str(run_dir))
    cfg = load_config(cfg_path)
    root, tag = find_checkpoint(run_dir, task, tag, log)
    check_destination(out, force)
    clean_stale_temps(out.parent, log)
    check_model_folder(cfg)
    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    target = resolve_dtype(dtype, default=config_dtype(config))
    tokenizer = load_tokenizer(cfg, log)
    log(f"export: reading {root / tag}")
    lazy = _read_zero_checkpoint(root, tag)
    if cfg.train.lora is not None:  # the checkpoint holds the adapters only
        return _export_lora_checkpoint(cfg, run_dir, root, tag, lazy, tokenizer, out, target,
                                       force, log)
    model = meta_model(config, dtype=target, trust_remote_code=cfg.trust_remote_code)
    _check_against_model(lazy, model, str(root / tag))
    _copy_generation_config(model, cfg.model)
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


def _export_lora_checkpoint(cfg: Any, run_dir: Path, root: Path, tag: str, lazy: dict[str, Any],
                            tokenizer: Any, out: Path, target: torch.dtype, force: bool,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """A LoRA checkpoint: base + merges + adapters on CPU, then the in-run export's writer."""
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model, merged = model_from_checkpoint(cfg, run_dir, root / tag, lazy, dtype)
    info = export_from_engine(model, tokenizer, out, dtype=target, force=force,
                              trust_remote_code=cfg.trust_remote_code,
                              info={"source": str((root / tag).absolute()), "tag": tag,
                                    "run_dir": str(run_dir.absolute()),
                                    "via": "zero_to_fp32 + base", "lora_merged": merged})
    log(f"export: wrote {out} ({info['parameters']:,} parameters, {info['tensors']} tensors, "
        f"{info['dtype']}) and its adapter/ from {tag}")
    return info


def _check_against_model(sd: dict[str, Any], model: torch.nn.Module, where: str) -> None:
    """Checkpoint names/shapes == the model the config implies (before anything is written)."""
    expected = model.state_dict()
    aliases = tied_aliases(model)
    for name, t in expected.items():
        if name not in sd:
            if name in aliases and aliases[name] in sd:
                continue
            raise ExportError(f"checkpoint lacks tensor {name} (shape {fmt_shape(t.shape)}) that "
                              f"the model config implies", file=where)
        got = tuple(sd[name].shape)
        if got != tuple(t.shape):
            raise ExportError(f"checkpoint tensor {name} has shape {fmt_shape(got)}, the model config "
                              f"implies {fmt_shape(t.shape)}", file=where)
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


def gather_units(engine_module: torch.nn.Module) -> int:
    """How many module gathers an export makes (its progress total)."""
    seen: set[int] = set()
    units = 0
    for module in engine_module.modules():  # as _gather_parameters: tied weights count once
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        units += bool(params)
    return units


def _gather_parameters(engine_module: torch.nn.Module, target: torch.dtype | None, main: bool,
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[dict[str, torch.Tensor], str | None]:
    """Every parameter under every name, gathered one module at a time (a collective); rank 0
    keeps CPU copies checked against the ZeRO-3 ``ds_shape``. (state dict, first problem).
    ``progress(1)`` after each module."""
    import deepspeed

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
        stop.check()  # every rank gathers the same modules in order: a safe point to stop
        if progress is not None:
            progress(1)
        seen.update(id(p) for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if not main:
                continue
            for p in params:
                want = tuple(getattr(p, "ds_shape", p.shape))
                t = p.detach().to(device="cpu", dtype=target or p.dtype, copy=True)
                if tuple(t.shape) != want or (t.numel() == 0 and 0 not in want):
                    bad = bad or (f"gathered {names[id(p)][0]} has shape "
                                  f"{fmt_shape(t.shape)}, expected {fmt_shape(want)}")
                for n in names[id(p)]:
                    sd[n] = t
    return sd, bad


def _write_engine_export(engine_module: torch.nn.Module, tokenizer: Any,
                         sd: dict[str, torch.Tensor], tmp: Path, out: Path,
                         target: torch.dtype | None, force: bool,
                         trust_remote_code: bool,
                         extra: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Rank 0: the gathered weights + buffers + tokenizer into ``tmp``, checked, renamed.
    ``extra`` writes more into ``tmp`` first and returns what export_info adds about it."""
    for name, buf in _persistent_buffers(engine_module).items():
        x = buf.detach().to("cpu", copy=True)
        sd[name] = x.to(target) if target is not None and x.is_floating_point() else x
    check_destination(out, force)
    clean_stale_temps(out.parent)
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
    more = extra(tmp) if extra is not None else {}
    return _finish(tmp, out, force, {"dtype": str(saved_dtype).removeprefix("torch."),
                                     "via": "engine", "world_size": dist.world_size(), **more},
                   trust_remote_code)


def export_from_engine(engine_module: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
                       dtype: str | torch.dtype | None = None, force: bool = True,
                       trust_remote_code: bool = False,
                       log: Callable[[str], None] | None = None,
                       info: dict[str, Any] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the engine's current weights as an HF folder. Call on ALL ranks (a collective).

    Parameters are gathered one module at a time (``GatheredParameters(..., modifier_rank=None)``);
    rank 0 keeps CPU copies (checked against the ZeRO-3 ``ds_shape``), writes with
    ``engine_module.save_pretrained(tmp, state_dict=...)`` + the tokenizer, verifies and renames
    into ``out_dir``. Other ranks write nothing (no shared filesystem needed). ``dtype`` None:
    the parameters' own dtype (bf16 when training in bf16: the weights the engine computes with,
    not the fp32 master copy). ``force`` (default True here: the run owns the folder) replaces an
    existing folder. The saved config has ``use_cache: true``. Every rank gets the same
    ExportError if rank 0 fails; returns export_info on every rank (rank 0's). A PEFT (LoRA)
    module is exported merged, with its adapter in ``adapter/`` (gere_ds/model/lora_export.py);
    ``info`` is added to export_info.
    """
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
    sd, bad = _gather_parameters(engine_module, target, main, progress)
    given, info = info or {}, {}
    err: str | None = None
    if main:
        tmp = _temp_dir(out)
        try:
            if bad:
                raise ExportError(bad, file=str(out))
            module, extra = engine_module, None
            if hasattr(engine_module, "peft_config"):  # LoRA: merged + adapter/
                module, sd, extra = lora_export_parts(engine_module, sd, given)
            elif given:
                extra = lambda folder: given  # noqa: E731
            info = _write_engine_export(module, tokenizer, sd, tmp, out, target, force,
                                        trust_remote_code, extra)
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
