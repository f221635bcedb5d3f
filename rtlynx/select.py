"""Automatic layer selection: which sites to make sparse for the most speed within a quality budget.

For every candidate site (the layers that read one input, rtlynx.sites) of a model:

- speed: the sparse kernel's speed-up over dense at the site's real GEMM shape (M rows per call, K, N summed
  over its members) on this GPU, from a per-device speed table (measured here, cached, or loaded from a file);
- quality cost: the relative output error of its layers on calibration inputs (``rtlynx calibrate`` statistics,
  with the LoRA the statistics give, or a quick measurement of norm-compensated pruning on sampled inputs).

``select_sites`` keeps the sites that gain speed (never one that loses) in order of time saved per unit of
cost until the budget is spent, and ``write_preset_file`` writes them as a preset file that
``sparsify(preset="file.json")`` (and so ``save`` / ``load``) accepts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

PRESET_FORMAT = "rtlynx-preset-1"


# ------------------------------------------------------------------------------------------ preset files
def write_preset_file(path, model_class: str, layers: list[str], info: dict | None = None,
                      overwrite: bool = False) -> Path:
    """A preset file naming exactly ``layers`` of a ``model_class`` model."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if not layers:
        raise ValueError("no layer selected: nothing to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": PRESET_FORMAT, "model_class": model_class, "include": list(layers),
                               **({"selection": info} if info else {})}, indent=1))
    tmp.replace(path)
    return path


def read_preset_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"preset file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != PRESET_FORMAT or not isinstance(d.get("include"), list):
        raise ValueError(f"{path} is not an rtlynx preset file (written by `rtlynx select`)")
    return d


def preset_file_config(config, module):
    """``config`` with its preset file replaced by the file's exact layer names (preset None): what runs, and
    what ``save`` writes, no longer depends on the file."""
    d = read_preset_file(config.preset)
    cls = type(module).__name__
    if d.get("model_class") not in (None, cls):
        raise ValueError(f"preset file {config.preset} was made for {d['model_class']}, the model is {cls}")
    missing = [n for n in d["include"] if not _has_linear(module, n)]
    if missing:
        raise ValueError(f"preset file {config.preset} names {len(missing)} layers this model lacks, e.g. {missing[0]}")
    return dataclasses.replace(config, preset=None, include=tuple(d["include"]) + tuple(config.include))


def _has_linear(module, name: str) -> bool:
    import torch.nn as nn

    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False
