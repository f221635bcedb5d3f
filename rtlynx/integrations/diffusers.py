"""diffusers glue: pipelines, the GELU FeedForward producer, the parallelism hook; tiny test transformers.

- :func:`as_module`: a model or a pipeline's ``.transformer``.
- The GELU-tanh producer: a site whose producer is "gelu" runs a diffusers ``FeedForward``'s down-projection on the
  pre-activation, so the lynx kernels fuse the GELU into the prune pass (:meth:`rtlynx.sites.Site.forward_gelu`).
- ``enable_parallelism``: a sparsified model's own, routed through rtlynx (rtlynx.api.enable_parallelism).
- Tiny random-config transformers (offline tests, demos) and example forward inputs: the configs mirror the real models' structure (block types, RoPE axes, MLPs) at toy width, the way
diffusers' own tests build them, so the real block code is what runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

TINY_CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
    "qwen-image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))),
    "z-image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])),
}


# Video transformers, kept apart from the image ones above (which the test suite runs one by one).
TINY_VIDEO_CONFIGS = {
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=96, num_layers=2, rope_max_seq_len=32)),
}


def tiny_transformer(kind: str, seed: int = 0, dtype=torch.float32):
    """A randomly initialised tiny diffusers transformer of ``kind`` (flux, qwen-image, z-image, wan)."""
    import diffusers

    configs = {**TINY_CONFIGS, **TINY_VIDEO_CONFIGS}
    if kind not in configs:
        raise ValueError(f"unknown tiny model {kind!r}; choose from {sorted(configs)}")
    cls_name, cfg = configs[kind]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**cfg).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def example_inputs(model, batch: int = 1, height: int = 8, width: int = 8, text_len: int = 6,
                   seed: int = 0, frames: int = 1) -> dict:
    """Random forward kwargs for a Flux / Qwen-Image / Z-Image / Wan transformer (latent ``height x width``; Wan:
    ``frames`` latent frames)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                                         indexing="ij"), -1).reshape(-1, 3).float()
        return dict(hidden_states=rnd(batch, height * width, cfg.in_channels),
                    encoder_hidden_states=rnd(batch, text_len, cfg.joint_attention_dim),
                    pooled_projections=rnd(batch, cfg.pooled_projection_dim),
                    timestep=torch.full((batch,), 0.5, device=dev), img_ids=ids.to(dev),
                    txt_ids=torch.zeros(text_len, 3, device=dev), return_dict=False)
    if name == "QwenImageTransformer2DModel":
        h, w = height // 2, width // 2
        return dict(hidden_states=rnd(batch, h * w, cfg.in_channels),
                    encoder_hidden_states=rnd(batch, text_len, cfg.joint_attention_dim),
                    encoder_hidden_states_mask=torch.ones(batch, text_len, device=dev, dtype=torch.long),
                    timestep=torch.full((batch,), 0.5, device=dev), img_shapes=[[(1, h, w)]] * batch,
                    return_dict=False)
    if name == "ZImageTransformer2DModel":
        return dict(x=[rnd(cfg.in_channels, 1, height, width) for _ in range(batch)],
                    t=torch.full((batch,), 0.5, device=dev),
                    cap_feats=[rnd(text_len, cfg.cap_feat_dim) for _ in range(batch)], return_dict=False)
    if name == "WanTransformer3DModel":
        return dict(hidden_states=rnd(batch, cfg.in_channels, frames, height, width),
                    timestep=torch.full((batch,), 500.0, device=dev),
                    encoder_hidden_states=rnd(batch, text_len, cfg.text_dim), return_dict=False)
    raise ValueError(f"no example inputs for {name}; pass your own forward kwargs")


# Transformer arguments shared by every row of a call even when their first dimension happens to equal the batch
# (FLUX's position ids are [tokens, 3]: 256 image tokens and a batch of 256 look alike).
BATCH_SHARED_ARGS = frozenset({"img_ids", "txt_ids"})


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a transformer forward (tuple / list / output object)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


# ---------------------------------------------------------------------------------------------- pipelines
def as_module(model) -> nn.Module:
    """Accept a module or a diffusers pipeline (whose denoiser is ``.transformer``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected an nn.Module or a pipeline with a .transformer, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------- GELU producer
def _gelu_feedforward_forward(self, hidden_states, *args, **kwargs):
    """diffusers FeedForward(GELU-tanh) forward with the down-projection read from the pre-activation."""
    wrapped = "_site" not in vars(self.net[2])  # a user's adapter wraps the down-projection: it needs GELU's output
    if wrapped or (self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.net)):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states
    up, down = self.net[0], self.net[2]
    y = down._site.forward_gelu(down, up.proj(hidden_states), up.gelu)
    for module in list(self.net)[3:]:
        y = module(y)
    return y


GELU_INPUT = "net.0.proj"  # in a FeedForward: the up-projection, whose output the GELU site prunes from


def _gelu_feedforward(parent: nn.Module, layer) -> bool:
    """Whether ``parent`` is a diffusers FeedForward [GELU(tanh) with .proj, Dropout*, layer, Dropout*]."""
    net = getattr(parent, "net", None)
    if type(parent).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) < 3:
        return False
    up = net[0]
    return (type(up).__name__ == "GELU" and getattr(up, "approximate", None) == "tanh" and hasattr(up, "proj")
            and net[2] is layer and all(isinstance(m, nn.Dropout) for i, m in enumerate(net) if i not in (0, 2)))


_PRODUCER_CLASSES: dict[type, type] = {}


def _new_producer_feedforward(base: type):
    """Unpickling: an empty instance of the producer class of ``base`` (its state is set after)."""
    return object.__new__(_producer_class(base))


def _reduce_producer_feedforward(self, protocol):
    # pickled as the diffusers class it derives from (found by name anywhere), swapped back on loading
    red = object.__reduce_ex__(self, protocol)
    return (_new_producer_feedforward, (type(self)._rtlynx_base,), *red[2:])


def _producer_class(base: type) -> type:
    """One subclass of ``base`` (diffusers' FeedForward) per base, with the GELU-producer forward: every block's
    FeedForward gets the same class, so torch.compile's guards (on the type, not on a per-instance forward) let one
    compiled block serve them all (a per-instance forward recompiled each block: 8 recompiles, then eager)."""
    cls = _PRODUCER_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {"forward": _gelu_feedforward_forward, "_rtlynx_base": base,
                                            "__reduce_ex__": _reduce_producer_feedforward,
                                            "__module__": base.__module__, "__qualname__": base.__qualname__})
        _PRODUCER_CLASSES[base] = cls
    return cls


def install_producer(module: nn.Module, site) -> None:
    """Wire the site's producer into the model (the GELU FeedForward's class swapped for its producer subclass);
    downgrade to "plain" if the module is not what the rule expects."""
    if site.producer != "gelu":
        return
    parent = module.get_submodule(site.name) if site.name else module
    if len(site.layers) == 1 and _gelu_feedforward(parent, site.layers[0]):
        base = getattr(type(parent), "_rtlynx_base", type(parent))
        parent.__class__ = _producer_class(base)
        parent._rtlynx_producer = site
        site.producer_input = GELU_INPUT
    else:
        site.producer = "plain"


def remove_producers(module: nn.Module) -> None:
    for mod in module.modules():
        if getattr(mod, "_rtlynx_producer", None) is not None:
            del mod._rtlynx_producer
            base = getattr(type(mod), "_rtlynx_base", None)
            if base is not None:
                mod.__class__ = base


# ---------------------------------------------------------------------------------------------- parallelism
def install_parallelism(module: nn.Module, method) -> None:
    """Route a diffusers model's ``enable_parallelism`` through ``method(self, *, config, cp_plan)`` (sparsify calls
    this; diffusers 0.42 offers no hook around enable_parallelism, so it is an attribute of the instance)."""
    if callable(getattr(type(module), "enable_parallelism", None)):
        module.enable_parallelism = functools.partial(method, module)  # a partial pickles; a bound MethodType does not


def uninstall_parallelism(module: nn.Module) -> None:
    if "enable_parallelism" in module.__dict__:
        del module.enable_parallelism


def tp_config(config):
    """The TensorParallelConfig inside a diffusers parallel config (None: none, or no tensor parallelism)."""
    try:
        from diffusers import TensorParallelConfig  # lazy: diffusers is an optional dependency
    except ImportError:  # a diffusers without tensor parallelism
        return None

    return config if isinstance(config, TensorParallelConfig) else getattr(config, "tensor_parallel_config", None)


# ---------------------------------------------------------------------------------------------- saving
def _refuse_save_pretrained(self, *args, **kwargs):
    raise ValueError(f"rtlynx: a sparsified {type(self).__name__} has no diffusers checkpoint format; "
                     "rtlynx.unsparsify(pipe) first to save_pretrained a plain diffusers folder (dense weights, your "
                     "adapters as diffusers writes them), then sparsify again, or rtlynx.save(pipe, folder) for the "
                     "sparsity config and compensation LoRA")


def install_save_refusal(module: nn.Module) -> None:
    """A sparsified model's ``save_pretrained`` (the pipeline's calls it for its transformer) refuses in one line
    that names the two ways to save, instead of diffusers' error about shared weight storage."""
    if callable(getattr(type(module), "save_pretrained", None)):
        module.save_pretrained = functools.partial(_refuse_save_pretrained, module)


def uninstall_save_refusal(module: nn.Module) -> None:
    module.__dict__.pop("save_pretrained", None)
