"""Save / load what sparsify adds to a model: config (JSON) + LoRA tensors (safetensors).

The base weights are never written: loading re-applies everything to a freshly built model. Every
check (types of every field, shapes, dtypes, finite values, the checksum) runs before the model is touched, so a
failed load leaves it as it was.

Directory layout::

    rtlynx_config.json         {"format": 1, "model_class": ..., "config": {...},
                                "layers": {name: {"in_features", "out_features", "lora_rank"}},
                                "lora_sha256": sha256 of rtlynx_lora.safetensors,
                                "provenance": {...} (optional: how the LoRA was made, e.g. under which adapter)}
    rtlynx_lora.safetensors    "<layer name>.lora_A" [r, K], "<layer name>.lora_B" [N, r] (floating point, finite)

A save is atomic, a new one and an overwrite alike: the tensors are written to a pending file named by their
checksum, and renaming the config into place commits (``read`` takes the pending file its config names until it is
renamed over the old tensors). An error rolls back to the old save; a killed process leaves the old save or the
new one, never a mix. The folder itself is never replaced (see ``_commit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from . import parallel, schedule, sites, validate
from ._txn import transaction
from .api import _apply, _as_module, check_layers, config_of, settings_of, site_rules, sparse_layers
from .config import SparsityConfig
from .integrations.peft import has_adapters
from .nn import SparseActLinear

CONFIG_FILE = "rtlynx_config.json"
LORA_FILE = "rtlynx_lora.safetensors"
FORMAT = 1
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def save(model, path, overwrite: bool = False, provenance: dict | None = None, warn_adapters: bool = True) -> Path:
    """Write the sparsity config and LoRA tensors of ``model`` to directory ``path``.

    ``provenance``: JSON-able facts of how the LoRA was made, kept beside the config and read back by
    :func:`provenance` (e.g. ``{"adapter": ...}``: the user adapter active while it was fitted; never applied).
    ``warn_adapters=False``: no warning that the user's adapters are not written (for a caller that says it once).

    Refuses to replace either file of an existing save unless ``overwrite=True``; other files in the
    directory are left alone. Refuses NaN / Inf LoRA tensors. See the module docstring for what a crash leaves.
    """
    module = _as_module(model)
    layers = sparse_layers(module)
    if not layers:
        raise ValueError("model has no SparseActLinear layers; nothing to save")
    parallel.refuse_sharded(module, "rtlynx.save")
    if warn_adapters and has_adapters(module):
        warnings.warn("rtlynx.save writes the sparsity config and the compensation LoRA, not your adapters (save "
                      "those as diffusers does: pipe.save_lora_weights / get_peft_model_state_dict)", UserWarning,
                      stacklevel=2)
    config = config_of(module) or SparsityConfig()
    overridden = sorted(n for n, l in layers.items() if l._override)
    if overridden:
        warnings.warn(f"rtlynx.save: per-layer overrides ({overridden[:3]}{'...' if len(overridden) > 3 else ''}) are "
                      "not saved; the saved config is the model's", RuntimeWarning, stacklevel=2)
    path = Path(path)
    for f in (CONFIG_FILE, LORA_FILE):  # either file: never replace a LoRA file whose config was not there
        if (path / f).exists() and not overwrite:
            raise FileExistsError(f"{path / f} exists; pass overwrite=True to replace it")
    tensors = {}
    for n, l in layers.items():
        if l.lora_A is not None:
            tensors[f"{n}.lora_A"] = l.lora_A.detach().contiguous().cpu()
            tensors[f"{n}.lora_B"] = l.lora_B.detach().contiguous().cpu()
    _check_tensors(tensors, "rtlynx.save")
    data = save_bytes(tensors, metadata={"format": str(FORMAT)})
    meta = {
        "format": FORMAT,
        "model_class": type(module).__name__,
        "config": config.to_dict(),
        "layers": {n: {"in_features": l.in_features, "out_features": l.out_features, "lora_rank": l.lora_rank}
                   for n, l in layers.items()},
        "lora_sha256": hashlib.sha256(data).hexdigest(),
    }
    if provenance:
        meta["provenance"] = provenance
    _commit(path, data, json.dumps(meta, indent=1), meta["lora_sha256"])
    return path


def _pending(path: Path, sha: str) -> Path:
    return path / f".rtlynx_lora.{sha}.pending"


def _commit(path: Path, data: bytes, config_text: str, sha: str) -> None:
    """Write a save into ``path`` so that at every instant the folder holds one whole save, the old or the new.

    The tensors go to a pending file named by their checksum, the config to a temporary file; renaming the config
    into place is the commit (``read`` finds the tensors a config names in the pending file until they are renamed
    over the old ones). An exception before the commit removes what was written; one after it restores the old
    config. The folder itself is never replaced (a mount point, its mode and group, a symlink to it stay)."""
    made = not path.exists()  # a folder this save creates is removed again on failure (its parents are kept)
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    pending, cfg_tmp, old_cfg = _pending(path, sha), path / f".{CONFIG_FILE}.tmp", path / f".{CONFIG_FILE}.old"
    committed = False
    old_cfg.unlink(missing_ok=True)  # left by a crashed save
    try:
        pending.write_bytes(data)
        cfg_tmp.write_text(config_text)
        for f in (pending, cfg_tmp):
            _fsync(f)
        had_old = (path / CONFIG_FILE).exists()
        if had_old:
            os.link(path / CONFIG_FILE, old_cfg)  # kept until the tensors are in place, for the rollback
        os.replace(cfg_tmp, path / CONFIG_FILE)  # the commit
        committed = True
        os.replace(pending, path / LORA_FILE)
        committed = False  # done: nothing left to roll back
        for stale in path.glob(".rtlynx_lora.*.pending"):  # a crashed save's, superseded now
            stale.unlink(missing_ok=True)
    except BaseException:
        if committed and had_old:
            os.replace(old_cfg, path / CONFIG_FILE)  # the old config names the old tensors, still in place
        elif committed:
            (path / CONFIG_FILE).unlink(missing_ok=True)
        for f in (pending, cfg_tmp):
            f.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    finally:
        old_cfg.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """On disk before the rename that publishes it (a power cut must not leave a renamed empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """LoRA tensors are floating point and finite (a NaN would poison every output it touches)."""
    for key, t in tensors.items():
        if t.dtype not in LORA_DTYPES:
            raise ValueError(f"{where}: {key} is {t.dtype}; LoRA tensors must be one of "
                             f"{[str(d).replace('torch.', '') for d in LORA_DTYPES]}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {key} holds NaN or Inf values")


def _check_layers(meta: dict, cfg_file: Path) -> None:
    """Types of every field of the layer table, before anything is applied (a rank of 4.0 fails here, not halfway
    through changing the model)."""
    if not isinstance(meta["model_class"], str):
        raise ValueError(f"{cfg_file}: model_class must be a string, got {meta['model_class']!r}")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{cfg_file}: layers must be a non-empty object of layer name -> sizes")
    for name, info in layers.items():
        if not isinstance(info, dict) or set(info) != {"in_features", "out_features", "lora_rank"}:
            raise ValueError(f"{cfg_file}: layers[{name!r}] must hold exactly in_features, out_features, lora_rank")
        for key, low in (("in_features", 1), ("out_features", 1), ("lora_rank", 0)):
            validate.integer(f"{cfg_file}: layers[{name!r}].{key}", info[key], low)
        if info["lora_rank"] > min(info["in_features"], info["out_features"]):
            raise ValueError(f"{cfg_file}: layers[{name!r}].lora_rank {info['lora_rank']} exceeds min(K, N) = "
                             f"{min(info['in_features'], info['out_features'])}")
    digest = meta.get("lora_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{cfg_file}: lora_sha256 must be a sha256 hex digest, got {digest!r}")


def _sha_matches(f: Path, sha: str) -> bool:
    return f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == sha


def provenance(path) -> dict:
    """How the save in ``path`` was made (``save(provenance=...)``; {} when it records nothing or is unreadable:
    provenance informs, it never stops a load)."""
    try:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    return prov if isinstance(prov, dict) else {}


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a saved directory: (metadata, tensors). Raises clear errors on damage."""
    path = Path(path)
    cfg_file, lora_file = path / CONFIG_FILE, path / LORA_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: not an rtlynx save directory (or an incomplete one)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is corrupt: {e}") from e
    except RecursionError:
        raise ValueError(f"{cfg_file} is corrupt: nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: unsupported format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("model_class", "config", "layers"):
        if key not in meta:
            raise ValueError(f"{cfg_file} lacks the field {key!r}")
    try:
        SparsityConfig.from_dict(meta["config"])  # validates every field's type and value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: bad config: {e}") from e
    _check_layers(meta, cfg_file)
    want = meta.get("lora_sha256")
    if want is not None and _pending(path, want).is_file() and not _sha_matches(lora_file, want):
        lora_file = _pending(path, want)  # a save interrupted after its commit: the tensors its config names
    if not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} is missing: not an rtlynx save directory (or an incomplete one)")
    data = lora_file.read_bytes()
    if want is None:
        warnings.warn(f"{cfg_file} records no checksum of {LORA_FILE} (saved by an older rtlynx): not verified",
                      RuntimeWarning, stacklevel=3)
    elif hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{lora_file} is corrupt or from another save: its sha256 does not match the one in "
                         f"{CONFIG_FILE} (a damaged file, or an interrupted save: save again)")
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{lora_file} is corrupt: {e}") from e
    _check_tensors(tensors, str(lora_file))
    return meta, tensors


def load(model, path, strict_class: bool = True, **overrides):
    """Re-apply a saved sparsification to a freshly built (dense) model, or to one sparsified with
    the same layers. Everything is checked first; on any error the model is left untouched. ``overrides`` change
    fields of the saved config as it is applied (e.g. ``keep_dense_weights=True`` before FP8 sites drop the bf16
    weights)."""
    module = _as_module(model)
    parallel.refuse_sharded(module, "rtlynx.load")
    meta, tensors = read(path)
    if strict_class and meta["model_class"] != type(module).__name__:
        raise ValueError(f"saved for {meta['model_class']}, but the model is {type(module).__name__} "
                         "(pass strict_class=False to load anyway)")
    config = SparsityConfig.from_dict({**meta["config"], **overrides})
    layers = meta["layers"]
    expected = set()
    for name, info in layers.items():
        try:
            mod = sites.layer_at(module, name)
        except AttributeError:
            raise ValueError(f"saved layer {name!r} does not exist in this model") from None
        if not isinstance(mod, (nn.Linear, SparseActLinear)):
            raise ValueError(f"saved layer {name!r} is a {type(mod).__name__} here, not a Linear")
        if (mod.in_features, mod.out_features) != (info["in_features"], info["out_features"]):
            raise ValueError(f"layer {name!r}: saved for {info['in_features']}->{info['out_features']}, "
                             f"model has {mod.in_features}->{mod.out_features}")
        r = info["lora_rank"]
        if r:
            for key, shape in ((f"{name}.lora_A", (r, mod.in_features)), (f"{name}.lora_B", (mod.out_features, r))):
                if key not in tensors:
                    raise ValueError(f"{LORA_FILE} lacks {key!r}")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)}, expected {shape}")
                expected.add(key)
    extra = set(tensors) - expected
    if extra:
        raise ValueError(f"{LORA_FILE} holds tensors for no saved layer: {sorted(extra)[:5]}")
    present = sparse_layers(module)
    if present and set(present) != set(layers):
        raise ValueError("model is already sparsified with a different layer set; load into a fresh model")
    settings = settings_of(module)
    if present and settings is not None and settings.config.fuse_sites != config.fuse_sites:
        raise ValueError(f"the model's sites were grouped with fuse_sites={settings.config.fuse_sites}, the save has "
                         f"{config.fuse_sites}; load into a fresh model")
    check_layers(module, layers, {n: info["lora_rank"] for n, info in layers.items()})
    site_rules(module, config)  # an unknown preset fails here, not in a later re-save's load
    for name, info in layers.items():
        mod = sites.layer_at(module, name)
        dtype = mod.compute_dtype if isinstance(mod, SparseActLinear) else mod.weight.dtype
        for key in (f"{name}.lora_A", f"{name}.lora_B") if info["lora_rank"] else ():
            validate.finite_in_dtype(f"{LORA_FILE}: {key}", tensors[key], dtype)

    # All checks passed: apply, all or nothing (a failure past this point is a bug or out of memory).
    extra = [settings, *sites.model_sites(module)] if settings is not None else sites.model_sites(module)
    old = [t for l in present.values() for t in (l.lora_A, l.lora_B)]
    with transaction(module, extra=extra, tensors=old):
        _apply_loaded(module, layers, config, tensors, present)
    return model


def _apply_loaded(module, layers: dict, config: SparsityConfig, tensors: dict, present: dict) -> None:
    if not present:
        _apply(module, list(layers), config, lora_rank=0)  # the saved LoRAs are added below
    settings = settings_of(module)
    if settings is None:  # layers sparsified one by one: give them one shared Settings now
        settings = sites.Settings(config)
        for layer in sparse_layers(module).values():
            layer._settings = settings
        module._rtlynx_settings = settings
    settings.config = config
    for name, layer in sparse_layers(module).items():
        layer._override.clear()
        r = layers[name]["lora_rank"]
        if r:
            layer.add_lora(r, rebuild=False)
            with torch.no_grad():
                layer.lora_A.copy_(tensors[f"{name}.lora_A"])
                layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        else:
            layer.remove_lora(rebuild=False)
    for site in sites.model_sites(module):
        site.refresh_overrides()
        site.build()  # the operands take the loaded LoRA tails
    schedule.install(module, sparse_layers(module).values(), config.dense_below_t, config.dense_above_t)
