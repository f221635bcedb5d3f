"""Text-to-image pipelines from disk, behind one small interface for calibrate / select / generate.

``load_runner(spec)`` accepts a local diffusers pipeline directory of a supported family (FLUX.1, Qwen-Image,
Z-Image: ``model_index.json`` names the class) or the shipped mini-FLUX ("miniflux", or a directory saved
with ``MiniFlux.save_pretrained``). Loading is offline (``local_files_only``): nothing is fetched.
Every bad input is a :class:`ModelError` with a one-line message, raised before anything is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cudagraphs, schedule
from .integrations.peft import has_adapters
from .models.miniflux import ASSET_DIR, load_miniflux, to_uint8

# Pipeline class -> how its __call__ takes guidance ("guidance_scale", or "true_cfg_scale" with a negative
# prompt) and which tokenizer bounds max_sequence_length (None: the pipeline has no such argument).
PIPELINES = {
    "FluxPipeline": {"guidance": "guidance_scale", "seq_tokenizer": "tokenizer_2"},
    "QwenImagePipeline": {"guidance": "true_cfg_scale", "seq_tokenizer": None},
    "ZImagePipeline": {"guidance": "guidance_scale", "seq_tokenizer": "tokenizer"},
}
MINIFLUX = "miniflux"
ADAPTER = "user"  # the adapter name of `--adapter` (one user adapter per command)


class ModelError(ValueError):
    """A model path that cannot be used (the message is meant for the user as it is)."""


def model_kind(spec: str | Path) -> str:
    """"miniflux" or the diffusers pipeline class of ``spec``; ModelError when it is neither usable."""
    if str(spec) == MINIFLUX:
        return MINIFLUX
    path = Path(spec)
    if not path.is_dir():
        raise ModelError(f"{spec}: no such directory (expected a local diffusers pipeline or 'miniflux')")
    index = path / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ModelError(f"{index} is not valid JSON: {e}") from None
        if cls not in PIPELINES:
            raise ModelError(f"{path}: pipeline class {cls!r} is not supported (supported: "
                             f"{', '.join(PIPELINES)} and the shipped mini-FLUX)")
        return cls
    if (path / "tokenizer.json").is_file() and any(path.glob("model-*.safetensors")) and _is_miniflux_config(path):
        return MINIFLUX
    raise ModelError(f"{path} is not a diffusers pipeline directory (no model_index.json) nor a mini-FLUX")


def _is_miniflux_config(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "image_size" in cfg and "patch_size" in cfg


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


@dataclass
class Runner:
    """A loaded text-to-image model: ``transformer`` (what rtlynx sparsifies) and ``sample``; ``compile`` makes the
    sampler call a compiled transformer (``called``), with CUDA graphs across its steps (rtlynx.cudagraphs)."""

    kind: str
    path: str
    transformer: torch.nn.Module
    device: str
    dtype: torch.dtype
    defaults: dict = field(default_factory=dict)
    called: torch.nn.Module | None = None  # what the sampler calls once compiled (None: ``transformer``)

    @property
    def _owner(self):
        """The object whose ``.transformer`` the sampler calls (the pipeline, the mini-FLUX)."""
        raise NotImplementedError

    def compile(self, regional: bool = False, mode: str | None = "reduce-overhead", **compile_kw) -> None:
        """Compile the transformer the sampler calls (whole, or block by block), one CUDA-graph step mark per
        sampling step (rtlynx.cudagraphs.compile). Compile after sparsify / load / configure."""
        owner = self._owner
        owner.transformer = cudagraphs.compile(owner.transformer, mode=mode, regional=regional, **compile_kw)
        self.called = owner.transformer

    def load_adapter(self, path: str | Path, scale: float = 1.0) -> dict:
        """Load a user's LoRA adapter (a .safetensors file in diffusers' or PEFT's key format, or a folder holding
        one) and make it the active adapter at ``scale``, before sparsify / load, as `--adapter` does. Returns its
        fingerprint (file name, sha256, scale): what a compensation fitted under it records. ModelError with one
        line on a missing, unreadable or non-matching file."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        file = adapter_file(path)
        data = file.read_bytes()
        try:
            state = load_bytes(data)
        except (SafetensorError, ValueError) as e:
            raise ModelError(f"--adapter {file}: not a safetensors file ({e})") from None
        if not any(".lora_A." in k or ".lora_down." in k for k in state):
            raise ModelError(f"--adapter {file}: no LoRA factors in it (keys like '...to_q.lora_A.weight')")
        try:
            self._load_adapter_state(state, scale)
        except (ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"--adapter {file}: does not fit this {self.kind}: {first}") from None
        if not has_adapters(self.transformer):
            raise ModelError(f"--adapter {file}: none of its layers is in this {self.kind}'s transformer")
        return _fingerprint(file, data, scale)

    def _load_adapter_state(self, state: dict, scale: float) -> None:
        raise NotImplementedError

    def uncompile(self) -> None:
        owner = self._owner
        owner.transformer = cudagraphs.uncompile(owner.transformer)
        self.called = None

    def sample(self, prompts: list[str], steps: int | None = None, guidance: float | None = None,
               height: int | None = None, width: int | None = None, seed: int = 0, latent: bool = False):
        """Images (a list of PIL images; ``latent=True``: skip decoding and return None) for ``prompts``."""
        raise NotImplementedError


class DiffusersRunner(Runner):
    pipe = None

    @property
    def _owner(self):
        return self.pipe

    def sample(self, prompts, steps=None, guidance=None, height=None, width=None, seed=0, latent=False):
        info = PIPELINES[self.kind]
        kw = {"prompt": list(prompts), "output_type": "latent" if latent else "pil",
              "generator": torch.Generator("cpu").manual_seed(seed)}
        for key, value in (("num_inference_steps", steps), ("height", height), ("width", width)):
            if value is not None:
                kw[key] = value
        if guidance is not None:
            kw[info["guidance"]] = guidance
        if info["guidance"] == "true_cfg_scale" and (guidance is None or guidance > 1):
            kw["negative_prompt"] = [" "] * len(prompts)  # true CFG (default 4) runs only with a negative prompt
        tok = getattr(self.pipe, info["seq_tokenizer"], None) if info["seq_tokenizer"] else None
        if tok is not None and getattr(tok, "model_max_length", 10 ** 9) < 512:
            kw["max_sequence_length"] = tok.model_max_length  # tiny tokenizers: the pipeline default (512) is too long
        out = self.pipe(**kw)
        return None if latent else list(out.images)

    def _load_adapter_state(self, state, scale):
        self.pipe.load_lora_weights(state, adapter_name=ADAPTER)  # converts the other trainers' key formats too
        self.pipe.set_adapters([ADAPTER], adapter_weights=[scale])


class MiniFluxRunner(Runner):
    model = None

    @property
    def _owner(self):
        return self.model

    def sample(self, prompts, steps=None, guidance=None, height=None, width=None, seed=0, latent=False):
        from PIL import Image

        size = self.model.config["image_size"]
        if (height or size) != size or (width or size) != size:
            raise ModelError(f"the mini-FLUX makes {size}x{size} images only")
        images = self.model.sample(list(prompts), num_steps=steps, guidance_scale=guidance, seed=seed)
        return None if latent else [Image.fromarray(a.numpy()) for a in to_uint8(images)]

    def _load_adapter_state(self, state, scale):
        prefix = "transformer" if all(k.startswith("transformer.") for k in state) else None  # diffusers' or PEFT's
        self.transformer.load_lora_adapter(state, prefix=prefix, adapter_name=ADAPTER)
        self.transformer.set_adapters([ADAPTER], weights=[scale])


def load_runner(spec: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> Runner:
    """Load ``spec`` (see the module docstring) on ``device`` (default: cuda if present) in ``dtype``
    (default: bf16 on a GPU, fp32 on the CPU)."""
    kind = model_kind(spec)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if kind == MINIFLUX:
        path = ASSET_DIR if str(spec) == MINIFLUX else Path(spec)
        model = load_miniflux(path, device=device, dtype=dtype)
        runner = MiniFluxRunner(kind, str(path), model.transformer, device, dtype,
                                {"steps": model.config["num_steps"], "guidance": model.config["guidance_scale"],
                                 "height": model.config["image_size"], "width": model.config["image_size"]})
        runner.model = model
        return runner
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(spec), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{spec}: cannot load the {kind} pipeline offline: {first}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersRunner(kind, str(spec), pipe.transformer, device, dtype)
    runner.pipe = pipe
    return runner


def adapter_file(path: str | Path) -> Path:
    """The safetensors file of ``--adapter``: the path itself, or the one in a folder (diffusers' name first)."""
    p = Path(path)
    if p.is_dir():
        named = p / "pytorch_lora_weights.safetensors"
        found = [named] if named.is_file() else sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise ModelError(f"--adapter {p}: {'no' if not found else 'more than one'} .safetensors file in the "
                             "folder; name the file")
        return found[0]
    if not p.is_file():
        raise ModelError(f"--adapter {p}: no such file or folder")
    return p


def adapter_fingerprint(path: str | Path, scale: float = 1.0) -> dict:
    """What a compensation fitted under the adapter ``path`` at ``scale`` records: file name, sha256, scale."""
    file = adapter_file(path)
    return _fingerprint(file, file.read_bytes(), scale)


def _fingerprint(file: Path, data: bytes, scale: float) -> dict:
    import hashlib

    return {"file": file.name, "sha256": hashlib.sha256(data).hexdigest(), "scale": float(scale)}


def load_transformer(spec: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Only the denoiser of ``spec`` (what train-lora and select need): no text encoders, no VAE."""
    kind = model_kind(spec)
    if kind == MINIFLUX:
        return load_runner(spec, device, dtype).transformer
    import diffusers

    device = device or default_device()
    path = Path(spec) / "transformer"
    try:
        cls_name = json.loads((path / "config.json").read_text())["_class_name"]
        model = getattr(diffusers, cls_name).from_pretrained(str(path), torch_dtype=dtype or default_dtype(device),
                                                              local_files_only=True)
    except (OSError, KeyError, AttributeError, ValueError, json.JSONDecodeError) as e:
        raise ModelError(f"{spec}: cannot load its transformer offline: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return model.to(device).eval()


class StepTimer:
    """Wall time of each sampling step's transformer calls: a step starts at the first call with a new noise level
    (CFG's second call of the same step joins it) and ends when its last call returns. Synchronises the GPU at
    call boundaries so the times are real. ``total`` is the whole block (text encoding and decoding included)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.spans: list[list[float]] = []
        self._last_t = object()
        self._handles = []

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, module, args, kwargs):
        t = schedule.noise_level(module, args, kwargs)
        self._sync()
        if t != self._last_t or not self.spans:
            self.spans.append([time.perf_counter(), None])
            self._last_t = t

    def _post(self, module, args, kwargs, out):
        self._sync()
        self.spans[-1][1] = time.perf_counter()

    def __enter__(self):
        self.spans, self._last_t = [], object()
        self._handles = [self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.transformer.register_forward_hook(self._post, with_kwargs=True)]
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._sync()
        self.total = time.perf_counter() - self._t0

    @property
    def steps(self) -> list[float]:
        """Seconds of transformer work per sampling step."""
        return [b - a for a, b in self.spans if b is not None]
