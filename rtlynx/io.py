"""Save / load what sparsify adds to a model: config (JSON) + LoRA tensors (safetensors).

The base weights are never written: loading re-applies everything to a freshly built model. Every
check runs before the model is touched, so a failed load leaves it as it was.

Directory layout::

    rtlynx_config.json         {"format": 1, "model_class": ..., "config": {...},
                                "layers": {name: {"in_features", "out_features", "lora_rank"}}}
    rtlynx_lora.safetensors    "<layer name>.lora_A" [r, K], "<layer name>.lora_B" [N, r]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import schedule
from . import sites
from .api import _apply, _as_module, config_of, settings_of, sparse_layers
from .config import SparsityConfig
from .nn import SparseActLinear

CONFIG_FILE = "rtlynx_config.json"
LORA_FILE = "rtlynx_lora.safetensors"
FORMAT = 1


def save(model, path, overwrite: bool = False) -> Path:
    """Write the sparsity config and LoRA tensors of ``model`` to directory ``path``.

    Refuses to replace an existing rtlynx directory unless ``overwrite=True``; other files in the
    directory are left alone. Written to a temporary directory first, so a crash leaves no half state.
    """
    module = _as_module(model)
    layers = sparse_layers(module)
    if not layers:
        raise ValueError("model has no SparseActLinear layers; nothing to save")
    config = config_of(module) or SparsityConfig()
    overridden = sorted(n for n, l in layers.items() if l._override)
    if overridden:
        import warnings

        warnings.warn(f"rtlynx.save: per-layer overrides ({overridden[:3]}{'...' if len(overridden) > 3 else ''}) are "
                      "not saved; the saved config is the model's", RuntimeWarning, stacklevel=2)
    path = Path(path)
    if (path / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{path / CONFIG_FILE} exists; pass overwrite=True to replace it")
    meta = {
        "format": FORMAT,
        "model_class": type(module).__name__,
        "config": config.to_dict(),
        "layers": {n: {"in_features": l.in_features, "out_features": l.out_features, "lora_rank": l.lora_rank}
                   for n, l in layers.items()},
    }
    tensors = {}
    for n, l in layers.items():
        if l.lora_A is not None:
            tensors[f"{n}.lora_A"] = l.lora_A.detach().contiguous().cpu()
            tensors[f"{n}.lora_B"] = l.lora_B.detach().contiguous().cpu()
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".rtlynx-tmp-"))
    try:
        save_file(tensors, str(tmp / LORA_FILE), metadata={"format": str(FORMAT)})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        for f in (LORA_FILE, CONFIG_FILE):  # config last: its presence marks a complete save
            os.replace(tmp / f, path / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a saved directory: (metadata, tensors). Raises clear errors on damage."""
    path = Path(path)
    cfg_file, lora_file = path / CONFIG_FILE, path / LORA_FILE
    for f in (cfg_file, lora_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: not an rtlynx save directory (or an incomplete one)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: unsupported format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("model_class", "config", "layers"):
        if key not in meta:
            raise ValueError(f"{cfg_file} lacks the field {key!r}")
    SparsityConfig.from_dict(meta["config"])  # validates
    try:
        tensors = load_file(str(lora_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{lora_file} is corrupt: {e}") from e
    return meta, tensors


def load(model, path, strict_class: bool = True):
    """Re-apply a saved sparsification to a freshly built (dense) model, or to one sparsified with
    the same layers. Everything is checked first; on any error the model is left untouched."""
    module = _as_module(model)
    meta, tensors = read(path)
    if strict_class and meta["model_class"] != type(module).__name__:
        raise ValueError(f"saved for {meta['model_class']}, but the model is {type(module).__name__} "
                         "(pass strict_class=False to load anyway)")
    config = SparsityConfig.from_dict(meta["config"])
    layers = meta["layers"]
    expected = set()
    for name, info in layers.items():
        try:
            mod = module.get_submodule(name)
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

    # All checks passed: apply.
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
    schedule.install(module, sparse_layers(module).values(), config.dense_below_t)
    return model
