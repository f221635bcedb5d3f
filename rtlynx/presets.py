"""Which linears of which model get sparsified: plain data, one entry per preset.

Names are fnmatch globs on qualified module names (``*`` also matches dots). A layer is sparsified
when it matches an ``include`` glob and no ``exclude`` glob. Conditioning-only layers (timestep /
modulation / pooled embedders: they run on M = batch rows and gain nothing), embedders and final
projections are never included.

- "<model>-paper": RT-Lynx's choice, Q/K/V and MLP up/down projections of every stream, attention
  output projections dense.
- "<model>" (the default, picked by "auto"): the same on the image stream only. The text stream runs on
  M = 128-512 rows, where the sparse kernels lose to dense (benchmarks/results/h100_linear.json) for
  1-4% of the FLOPs, and on the mini-FLUX it was the most pruning-sensitive part that the LoRA could not
  repair (benchmarks/results/layer_ablation_streams.json).
- "<model>-all": every token-level linear inside the blocks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.nn as nn

# Globs that name conditioning-only, embedding or output-head linears in diffusers transformers.
# They are excluded by every preset, including user-written include rules that would catch them.
CONDITIONING_EXCLUDES = (
    "*time*embed*", "*timestep*", "*guidance_embed*", "*text_embedder*", "*t_embedder*",
    "*adaLN*", "*adaln*", "*_mod.*", "*norm*.linear", "*norm_out*", "*condition_embedder*",
    "*caption_projection*", "*pos_embed*",
)

# Layers outside the transformer blocks (input embedders, output heads) plus the conditioning ones: no preset
# includes them; a hand-written layer table or preset file that does gets a warning (rtlynx.api.check_layers).
OUTSIDE_BLOCK_GLOBS = CONDITIONING_EXCLUDES + ("*embed*", "proj_out", "*final_layer*", "img_in", "txt_in",
                                               "norm_out*")


def outside_blocks(names) -> list[str]:
    """The names among ``names`` that are embedders, conditioning layers or output heads."""
    import fnmatch

    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in OUTSIDE_BLOCK_GLOBS)]


# Activation sites (rtlynx.sites): sparse layers that read the same input are one site, pruned once and run as one
# sparse GEMM over their concatenated weights. A rule is (parent glob, producer, member names under the parent);
# a layer joins the first rule that names it, layers no rule names are sites of their own. Producers: "plain"
# (the input as given) and "gelu" (a diffusers FeedForward whose down-projection reads GELU-tanh(up): the GELU
# runs inside the prune pass; any other FeedForward falls back to "plain").
FLUX_SINGLE_SITE = ("single_transformer_blocks.*", "plain", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
QKV_SITE = ("*", "plain", ("to_q", "to_k", "to_v"))
ADDED_QKV_SITE = ("*", "plain", ("add_q_proj", "add_k_proj", "add_v_proj"))
GELU_FF_SITE = ("*", "gelu", ("net.2",))
SWIGLU_UP_SITE = ("*", "plain", ("w1", "w3"))
DEFAULT_SITES = (QKV_SITE, ADDED_QKV_SITE, GELU_FF_SITE, SWIGLU_UP_SITE)

# Speed-aware defaults (SparsityConfig.speed_rules): on the GPU kernels a site runs dense when a call has at most
# max_dense_tokens rows or the site's K or N is at most max_dense_features: there the sparse kernels lose to cuBLAS.
# benchmarks/results/h100_linear.json: the M = 512 shapes run 0.86-1.07x, the K or N = 64 shapes 0.49-0.83x, every
# shape with M >= 4096 and K, N >= 3072 wins (eager); the H200 table (../shared/notes/h200_state.md): 0.69x geomean
# over the 20 shapes eager against 1.27x on the 12 large ones. 1152 lies between the two groups.
SPEED_RULES = {"max_dense_tokens": 512, "max_dense_features": 1152}

PRESETS: dict[str, dict] = {
    "flux": {
        "models": ["FluxTransformer2DModel"],
        "auto": True,
        "doc": "FLUX.1 image stream: Q/K/V and MLP up/down; text stream and attention outputs dense",
        "sites": (FLUX_SINGLE_SITE, *DEFAULT_SITES),
        "include": [
            "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
            "transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2",
            "single_transformer_blocks.*.attn.to_q", "single_transformer_blocks.*.attn.to_k",
            "single_transformer_blocks.*.attn.to_v", "single_transformer_blocks.*.proj_mlp",
            # K = [attention output | GELU(MLP up)]: mostly the MLP down-projection.
            "single_transformer_blocks.*.proj_out",
        ],
        "exclude": [],
    },
    "flux-paper": {
        "models": ["FluxTransformer2DModel"],
        "doc": "FLUX.1 as RT-Lynx: Q/K/V (both streams) and MLP up/down; attention outputs dense",
        "sites": (FLUX_SINGLE_SITE, *DEFAULT_SITES),
        "include": [
            "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
            "transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
            "transformer_blocks.*.attn.add_v_proj",
            "transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2",
            "transformer_blocks.*.ff_context.net.0.proj", "transformer_blocks.*.ff_context.net.2",
            "single_transformer_blocks.*.attn.to_q", "single_transformer_blocks.*.attn.to_k",
            "single_transformer_blocks.*.attn.to_v", "single_transformer_blocks.*.proj_mlp",
            # K = [attention output | GELU(MLP up)]: mostly the MLP down-projection.
            "single_transformer_blocks.*.proj_out",
        ],
        "exclude": [],
    },
    "flux-all": {
        "models": ["FluxTransformer2DModel"],
        "doc": "FLUX.1: every token-level linear inside the blocks",
        "sites": (FLUX_SINGLE_SITE, *DEFAULT_SITES),
        "include": ["transformer_blocks.*", "single_transformer_blocks.*"],
        "exclude": [],
    },
    "qwen-image": {
        "models": ["QwenImageTransformer2DModel"],
        "auto": True,
        "doc": "Qwen-Image image stream: Q/K/V and MLP up/down; text stream and attention outputs dense",
        "sites": DEFAULT_SITES,
        "include": [
            "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
            "transformer_blocks.*.img_mlp.net.0.proj", "transformer_blocks.*.img_mlp.net.2",
        ],
        "exclude": [],
    },
    "qwen-image-paper": {
        "models": ["QwenImageTransformer2DModel"],
        "doc": "Qwen-Image as RT-Lynx: Q/K/V (both streams) and MLP up/down; attention outputs dense",
        "sites": DEFAULT_SITES,
        "include": [
            "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
            "transformer_blocks.*.attn.add_q_proj", "transformer_blocks.*.attn.add_k_proj",
            "transformer_blocks.*.attn.add_v_proj",
            "transformer_blocks.*.img_mlp.net.0.proj", "transformer_blocks.*.img_mlp.net.2",
            "transformer_blocks.*.txt_mlp.net.0.proj", "transformer_blocks.*.txt_mlp.net.2",
        ],
        "exclude": [],
    },
    "qwen-image-all": {
        "models": ["QwenImageTransformer2DModel"],
        "doc": "Qwen-Image: every token-level linear inside the blocks",
        "sites": DEFAULT_SITES,
        "include": ["transformer_blocks.*"],
        "exclude": [],
    },
    "z-image": {
        "models": ["ZImageTransformer2DModel"],
        "auto": True,
        "doc": "Z-Image: Q/K/V and SwiGLU w1/w3/w2 of the main layers and the noise refiner; "
               "the caption (context) refiner and attention outputs dense",
        "sites": DEFAULT_SITES,
        "include": [
            "layers.*.attention.to_q", "layers.*.attention.to_k", "layers.*.attention.to_v",
            "noise_refiner.*.attention.to_q", "noise_refiner.*.attention.to_k", "noise_refiner.*.attention.to_v",
            "layers.*.feed_forward.w1", "layers.*.feed_forward.w2", "layers.*.feed_forward.w3",
            "noise_refiner.*.feed_forward.w1", "noise_refiner.*.feed_forward.w2", "noise_refiner.*.feed_forward.w3",
        ],
        "exclude": [],
    },
    "z-image-paper": {
        "models": ["ZImageTransformer2DModel"],
        "doc": "Z-Image as RT-Lynx: Q/K/V and SwiGLU w1/w3 (up) and w2 (down) in all layers and refiners",
        "sites": DEFAULT_SITES,
        "include": [
            "*layers.*.attention.to_q", "*layers.*.attention.to_k", "*layers.*.attention.to_v",
            "*refiner.*.attention.to_q", "*refiner.*.attention.to_k", "*refiner.*.attention.to_v",
            "*layers.*.feed_forward.w1", "*layers.*.feed_forward.w2", "*layers.*.feed_forward.w3",
            "*refiner.*.feed_forward.w1", "*refiner.*.feed_forward.w2", "*refiner.*.feed_forward.w3",
        ],
        "exclude": [],
    },
    "z-image-all": {
        "models": ["ZImageTransformer2DModel"],
        "doc": "Z-Image: every token-level linear inside the layers and refiners",
        "sites": DEFAULT_SITES,
        "include": ["layers.*", "noise_refiner.*", "context_refiner.*"],
        "exclude": [],
    },
    "default": {
        "models": [],
        "auto": True,
        "doc": "Any other diffusers transformer (SD3, PixArt, DiT, Wan...): token linears inside the blocks",
        "sites": DEFAULT_SITES,
        "include": ["transformer_blocks.*", "single_transformer_blocks.*", "blocks.*", "layers.*"],
        # cross-attention keys / values read the text (or image) condition, not the tokens: conditioning-only, and
        # grouped with the query they would make a site whose members read different inputs
        "exclude": ["*attn2.to_k", "*attn2.to_v", "*attn2.add_k_proj", "*attn2.add_v_proj"],
    },
}

# The preset "auto" picks by model class name; unknown classes get "default".
MODEL_PRESETS = {cls: name for name, p in PRESETS.items() if p.get("auto") for cls in p["models"]}


def resolve_preset(name: str | None, model_class: str) -> str | None:
    """Preset name for ``name`` ("auto" -> by model class, None -> no preset)."""
    if name is None or name == "none":
        return None
    if name == "auto":
        return MODEL_PRESETS.get(model_class, "default")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}, 'auto' or None")
    return name

# How each model class receives the diffusion time, for SparsityConfig.dense_below_t: (argument name, the
# value that means pure noise). diffusers' Flux / Qwen-Image pipelines pass timestep/1000 (1 = noise);
# Z-Image's passes t = (1000 - timestep)/1000 (0 = noise). Others: "timestep", 1 = noise (values above 1
# are read on the 0-1000 scale).
TIME_ARGS = {
    "FluxTransformer2DModel": ("timestep", 1.0),
    "QwenImageTransformer2DModel": ("timestep", 1.0),
    "ZImageTransformer2DModel": ("t", 0.0),
}
DEFAULT_TIME_ARG = ("timestep", 1.0)

# The argument holding the sampler's state x_t, for global distillation's endpoint target, in the models whose
# sampler is flow matching with x_0 = x_t - t * output (t the noise level). Z-Image is not listed: its pipeline
# negates the output and runs t the other way.
FLOW_STATE_ARGS = {
    "FluxTransformer2DModel": "hidden_states",
    "QwenImageTransformer2DModel": "hidden_states",
}


# ------------------------------------------------------------------------------------------ preset files
# A preset file (written by ``rtlynx select``, read by ``sparsify(preset="file.json")``) names exact layers.
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


def read_json(path: Path, what: str):
    """The JSON in ``path``; FileNotFoundError / ValueError naming ``what`` if it is missing or not JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def read_preset_file(path) -> dict:
    path = Path(path)
    d = read_json(path, "preset file")
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
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False
