"""MiniFlux: a small FLUX-architecture text-to-image model in pixel space, with its own text encoder.

- `transformer`: diffusers `FluxTransformer2DModel` on 64x64x3 images cut into 4x4 patches
  (256 tokens of 48 channels). This is the module to hand to `rtlynx.sparsify`.
- `text_encoder`: a word-level tokenizer over the prompt vocabulary + a small transformer encoder trained
  jointly from scratch; it feeds `encoder_hidden_states` (all tokens) and `pooled_projections` (CLS token).
- Rectified flow as FLUX: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0; sampling integrates
  from t=1 to 0 with diffusers' FlowMatchEulerDiscreteScheduler (Euler) and classifier-free guidance.

Files (`save_pretrained` / `from_pretrained`): config.json, tokenizer.json, model-XXXXX-of-XXXXX.safetensors.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _compile

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "miniflux"

DEFAULT_CONFIG = {
    "image_size": 64,
    "patch_size": 4,
    "channels": 3,
    # FluxTransformer2DModel
    "width": 256,
    "head_dim": 64,
    "num_layers": 4,  # double-stream blocks
    "num_single_layers": 8,
    "axes_dims_rope": [16, 24, 24],
    # text encoder
    "text_width": 256,
    "text_layers": 2,
    "text_heads": 4,
    "max_text_len": 16,
    # sampling defaults
    "num_steps": 30,
    "guidance_scale": 4.0,
    "shift": 1.0,
}

_WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Lower-case word tokenizer with a fixed vocabulary. Ids: 0 pad, 1 unk, 2 cls, then words."""

    PAD, UNK, CLS = 0, 1, 2
    SPECIAL = ["[PAD]", "[UNK]", "[CLS]"]

    def __init__(self, words: list[str], max_len: int = 24):
        if max_len < 2:
            raise ValueError("max_len must be >= 2 (CLS + one word)")
        self.vocab = self.SPECIAL + [w for w in words if w not in self.SPECIAL]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    @classmethod
    def fit(cls, texts, max_len: int = 24, min_count: int = 1) -> "WordTokenizer":
        counts: dict[str, int] = {}
        for t in texts:
            for w in _WORD.findall(str(t).lower()):
                counts[w] = counts.get(w, 0) + 1
        return cls(sorted(w for w, c in counts.items() if c >= min_count), max_len)

    def __len__(self):
        return len(self.vocab)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[B, max_len] long: CLS, words (truncated), pad. An empty prompt is CLS + pads (the null prompt)."""
        out = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.CLS] + [self.index.get(w, self.UNK) for w in _WORD.findall(str(t).lower())]
            ids = ids[: self.max_len]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def to_json(self) -> str:
        return json.dumps({"type": "rtlynx-word-tokenizer", "max_len": self.max_len, "vocab": self.vocab})

    @classmethod
    def from_json(cls, s: str) -> "WordTokenizer":
        d = json.loads(s)
        if d.get("type") != "rtlynx-word-tokenizer" or d["vocab"][:3] != cls.SPECIAL:
            raise ValueError("not an rtlynx word tokenizer JSON")
        return cls(d["vocab"][3:], d["max_len"])


class TextEncoder(nn.Module):
    """Token + position embeddings, pre-norm transformer encoder; returns (tokens [B,L,D], pooled [B,D])."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=ids == WordTokenizer.PAD)
        h = self.norm(h)
        return h, h[:, 0]  # CLS token is the pooled vector


class MiniFlux(nn.Module):
    def __init__(self, config: dict | None = None, tokenizer: WordTokenizer | None = None):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        if cfg["image_size"] % cfg["patch_size"]:
            raise ValueError("image_size must be a multiple of patch_size")
        if cfg["width"] % cfg["head_dim"] or sum(cfg["axes_dims_rope"]) != cfg["head_dim"]:
            raise ValueError("width must be a multiple of head_dim, and axes_dims_rope must sum to head_dim")
        if tokenizer is None:
            raise ValueError("a WordTokenizer is needed (WordTokenizer.fit(prompts))")
        cfg["vocab_size"] = len(tokenizer)
        cfg["max_text_len"] = tokenizer.max_len
        self.config = cfg
        self.tokenizer = tokenizer
        p, c = cfg["patch_size"], cfg["channels"]
        self.grid = cfg["image_size"] // p
        self.text_encoder = TextEncoder(len(tokenizer), cfg["text_width"], cfg["text_layers"],
                                        cfg["text_heads"], tokenizer.max_len)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=p * p * c, out_channels=p * p * c,
            num_layers=cfg["num_layers"], num_single_layers=cfg["num_single_layers"],
            attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["width"] // cfg["head_dim"],
            joint_attention_dim=cfg["text_width"], pooled_projection_dim=cfg["text_width"],
            guidance_embeds=False, axes_dims_rope=tuple(cfg["axes_dims_rope"]))
        g = self.grid
        img_ids = torch.zeros(g, g, 3)
        img_ids[..., 1] = torch.arange(g)[:, None]
        img_ids[..., 2] = torch.arange(g)[None, :]
        self.register_buffer("img_ids", img_ids.reshape(g * g, 3), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(tokenizer.max_len, 3), persistent=False)

    # ---- layout: images [B,3,H,W] in [-1,1] <-> tokens [B, (H/p)(W/p), p*p*3]
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config["patch_size"]
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        p, c, g = self.config["patch_size"], self.config["channels"], self.grid
        t = t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, c, g * p, g * p)

    def encode_text(self, prompts_or_ids) -> tuple[torch.Tensor, torch.Tensor]:
        ids = prompts_or_ids
        if not torch.is_tensor(ids):
            ids = self.tokenizer.encode(list(ids))
        return self.text_encoder(ids.to(self.img_ids.device))

    def forward(self, x_tokens: torch.Tensor, t: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor],
                transformer=None):
        """Velocity prediction. x_tokens [B,N,p*p*3], t [B] in [0,1] (1 = noise), text from encode_text.
        `transformer` overrides self.transformer (e.g. a torch.compile'd wrapper sharing its weights)."""
        hidden, pooled = text
        return (self.transformer if transformer is None else transformer)(hidden_states=x_tokens, encoder_hidden_states=hidden,
                                pooled_projections=pooled, timestep=t, img_ids=self.img_ids,
                                txt_ids=self.txt_ids[: hidden.shape[1]], return_dict=False)[0]

    def loss(self, images: torch.Tensor, ids: torch.Tensor, generator=None, t_mean: float = 0.0,
             t_std: float = 1.0, transformer=None) -> torch.Tensor:
        """Rectified-flow loss; images [B,3,H,W] in [-1,1], ids [B,L] (null prompts already mixed in).
        t ~ logit-normal(t_mean, t_std) as SD3/FLUX."""
        x0 = self.patchify(images)
        b = x0.shape[0]
        t = torch.sigmoid(t_mean + t_std * torch.randn(b, device=x0.device, generator=generator))
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = self(xt, t, self.encode_text(ids), transformer)
        return F.mse_loss(v.float(), (eps - x0).float())

    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int | None = None, guidance_scale: float | None = None,
               seed: int = 0, noise: torch.Tensor | None = None, progress: bool | str = False) -> torch.Tensor:
        """Generate images [B,3,H,W] in [-1,1]. Same seed (or noise) gives the same start noise.
        ``progress``: a bar over the steps (a string: its label); it clears when done."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from tqdm import tqdm

        num_steps = num_steps or self.config["num_steps"]
        gs = self.config["guidance_scale"] if guidance_scale is None else guidance_scale
        dev = self.img_ids.device
        b = len(prompts)
        n, d = self.grid ** 2, self.config["patch_size"] ** 2 * self.config["channels"]
        if noise is None:
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(b, n, d, generator=g)
        x = noise.to(dev, torch.float32)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.config["shift"])
        sched.set_timesteps(num_steps, device=dev)
        cond = self.encode_text(prompts)
        if gs != 1.0:
            unc = self.encode_text([""] * b)
            text = (torch.cat([cond[0], unc[0]]), torch.cat([cond[1], unc[1]]))
        else:
            text = cond
        dtype = next(self.transformer.parameters()).dtype
        compiled = _compile.is_compiled(self.transformer)  # CUDA graphs: one mark per step (rtlynx.cudagraphs)
        for tstep in tqdm(sched.timesteps, desc=progress if isinstance(progress, str) else "sample",
                          disable=not progress, leave=False, unit="step"):
            t = (tstep / 1000).expand(b).to(dev)
            if compiled:
                _compile.mark_step()
            if gs != 1.0:
                v = self(torch.cat([x, x]).to(dtype), torch.cat([t, t]).to(dtype),
                         (text[0].to(dtype), text[1].to(dtype))).float()
                vc, vu = v.chunk(2)
                v = vu + gs * (vc - vu)
            else:
                v = self(x.to(dtype), t.to(dtype), (text[0].to(dtype), text[1].to(dtype))).float()
            x = sched.step(v, tstep, x, return_dict=False)[0]
        return self.unpatchify(x).clamp(-1, 1)

    # ---- files
    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype | None = torch.float16,
                        max_shard_mb: float = 15.0, extra_config: dict | None = None) -> list[Path]:
        """Write config.json, tokenizer.json and safetensors shards (each <= max_shard_mb)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
              for k, v in self.state_dict().items()}
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nb = v.numel() * v.element_size()
            if cur and size + nb > max_shard_mb * 2 ** 20:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += nb
        shards.append(cur)
        for old in out.glob("model-*.safetensors"):  # stale shards of a different split
            old.unlink()
        paths = []
        for i, s in enumerate(shards):
            p = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s, p)
            paths.append(p)
        cfg = dict(self.config)
        cfg.update(extra_config or {})
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        (out / "tokenizer.json").write_text(self.tokenizer.to_json())
        return paths

    @classmethod
    def from_pretrained(cls, path: str | Path = ASSET_DIR, device="cpu", dtype=torch.float32) -> "MiniFlux":
        from safetensors.torch import load_file

        path = Path(path)
        files = sorted(path.glob("model-*.safetensors"))
        if not (path / "config.json").is_file() or not files:
            raise FileNotFoundError(f"no MiniFlux model in {path} (need config.json, tokenizer.json, "
                                    "model-*.safetensors)")
        cfg = json.loads((path / "config.json").read_text())
        tok = WordTokenizer.from_json((path / "tokenizer.json").read_text())
        model = cls(cfg, tok)
        sd = {}
        for f in files:
            sd.update(load_file(f))
        model.load_state_dict(sd, strict=True)  # load_state_dict copies (and casts) into fp32 params
        return model.to(device=device, dtype=dtype).eval()


def load_miniflux(path: str | Path = ASSET_DIR, device="cpu", dtype=torch.float32) -> MiniFlux:
    """Load the shipped model (rtlynx/assets/miniflux/) or one saved with save_pretrained."""
    return MiniFlux.from_pretrained(path, device=device, dtype=dtype)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,H,W,3] uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images_u8, nrow: int, pad: int = 2):
    """[B,H,W,3] uint8 -> one PIL image, white padding."""
    import numpy as np
    from PIL import Image

    a = np.asarray(images_u8)
    b, h, w, c = a.shape
    ncol = math.ceil(b / nrow) if b else 1
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = a[i]
    return Image.fromarray(grid)
