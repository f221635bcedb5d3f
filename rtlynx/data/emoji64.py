"""Emoji-64: 64x64 RGB emoji images with text prompts, built from npm packages.

Sources (see EMOJI64_CARD.md): Google Noto and Twemoji PNGs from `emoji-datasource-*`, Fluent 3D WebPs
from `@lobehub/fluent-emoji-3d` (downsized 256 -> 64), emoji names from `emoji.json` and `emojilib`.
Every image is composited on white. Skin-tone variants share the identity of their base emoji.

The result is cached as one compressed uint8 npz (no pickles):
  images [N,64,64,3] uint8, identity [N] int32, style [N] int8, category [N] int8,
  prompts [N] str, names [N] str (identity name), codepoints [N] str,
  category_names [C] str, style_names [S] str, meta (JSON string).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import EMOJI64_PATH

FORMAT_VERSION = 1
SIZE = 64
DEFAULT_PATH = EMOJI64_PATH

# npm package, version, images folder inside the package, file extension, style word
PACKAGES = {
    "noto": ("emoji-datasource-google", "16.0.0", "package/img/google/64/", ".png"),
    "twemoji": ("emoji-datasource-twitter", "16.0.0", "package/img/twitter/64/", ".png"),
    "3d": ("@lobehub/fluent-emoji-3d", "1.1.0", "package/assets/", ".webp"),
}
KEYWORDS_PACKAGE = ("emojilib", "4.0.3")
# npm's dist.integrity of each tarball (`npm view NAME@VERSION dist.integrity`): checked before a tarball is read,
# whether npm just fetched it or it was cached.
NPM_INTEGRITY = {
    ("emoji-datasource-google", "16.0.0"):
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ("emoji-datasource-twitter", "16.0.0"):
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ("@lobehub/fluent-emoji-3d", "1.1.0"):
        "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
    ("emojilib", "4.0.3"):
        "sha512-KbWiYre9aRSaPbHrHZIz9zmoM+21LAsK1VFJtnTh1VCtWE/rNMDviGhQTmselFl95dhqtGlY22iH0leG5BuW0g==",
}
STYLE_NAMES = ("noto", "twemoji", "3d")
STYLE_PHRASES = {"noto": "noto style", "twemoji": "twemoji style", "3d": "3d style"}
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
REQUIRED_KEYS = ("images", "identity", "style", "category", "prompts", "names", "codepoints",
                 "category_names", "style_names", "meta")


class Package:
    """Read files of an npm package from a .tgz or an unpacked folder (holding `package/`)."""

    def __init__(self, path: str | Path, prefixes: tuple[str, ...] = ("package/",)):
        self.path = Path(path)
        self.files: dict[str, bytes] | None = None
        if self.path.is_file():
            # Keep only the members we need: the tarballs also hold 14 MB sprite sheets.
            self.files = {}
            with tarfile.open(self.path, "r:gz") as tf:
                for m in tf:
                    if m.isfile() and any(m.name.startswith(p) for p in prefixes):
                        self.files[m.name] = tf.extractfile(m).read()
        elif not self.path.is_dir():
            raise FileNotFoundError(f"npm package not found: {self.path}")

    def read(self, rel: str) -> bytes | None:
        if self.files is not None:
            return self.files.get(rel)
        p = self.path / rel
        return p.read_bytes() if p.is_file() else None


def npm_fetch(name: str, version: str, cache_dir: str | Path) -> Path:
    """`npm pack name@version` into cache_dir (once); returns the .tgz path."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tgz = cache_dir / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tgz.exists():
        try:
            subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=cache_dir, check=True,
                           stdout=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise RuntimeError("npm is needed to fetch the emoji packages (or pass unpacked folders)") from e
    if not tgz.exists():
        raise RuntimeError(f"npm pack did not produce {tgz}")
    check_integrity(tgz, name, version)
    return tgz


def check_integrity(tgz: Path, name: str, version: str) -> None:
    """The tarball's sha512 is the pinned npm integrity of name@version (ValueError otherwise)."""
    import base64
    import hashlib

    want = NPM_INTEGRITY.get((name, version))
    if want is None:
        raise ValueError(f"no pinned integrity for {name}@{version}: add its `npm view` dist.integrity to NPM_INTEGRITY")
    h = hashlib.sha512()
    with open(tgz, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    got = "sha512-" + base64.b64encode(h.digest()).decode()
    if got != want:
        raise ValueError(f"{tgz} is not {name}@{version} as published (sha512 differs from the pinned integrity): "
                         "delete it and build again")


def _char(unified: str) -> str:
    return "".join(chr(int(c, 16)) for c in unified.split("-"))


def _clean_name(entry: dict, keywords: dict) -> str:
    """Lower-case human name: emojilib's CLDR name if known (better for flags), else emoji.json's."""
    for key in (entry.get("unified", ""), entry.get("non_qualified") or ""):
        if key and _char(key) in keywords and keywords[_char(key)]:
            return keywords[_char(key)][0].replace("_", " ").strip()
        if key and _char(key).replace("\ufe0f", "") in keywords:
            return keywords[_char(key).replace("\ufe0f", "")][0].replace("_", " ").strip()
    name = entry.get("name") or entry.get("short_name") or entry["unified"]
    return name.lower().replace("_", " ").strip()


def _skin_phrase(code: str) -> str:
    tones = [SKIN_TONES[c] for c in code.split("-")]
    return tones[0] if len(set(tones)) == 1 else ", ".join(tones)


def _to_rgb64(data: bytes) -> np.ndarray:
    """Decode, composite on white (at the source size, so edges don't go dark), resize to 64x64."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(bg, im).convert("RGB")
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


@dataclass
class Record:
    unified: str
    image: str  # file stem as the packages name it, e.g. "1f385-1f3fb"
    identity: int
    name: str
    prompt_name: str
    category: str


def _records(emoji_json: list[dict], keywords: dict) -> list[Record]:
    recs = []
    for ident, e in enumerate(sorted(emoji_json, key=lambda e: e.get("sort_order", 0))):
        name = _clean_name(e, keywords)
        stem = e["image"].rsplit(".", 1)[0]
        recs.append(Record(e["unified"], stem, ident, name, name, e["category"]))
        for code, var in (e.get("skin_variations") or {}).items():
            recs.append(Record(var["unified"], var["image"].rsplit(".", 1)[0], ident, name,
                               f"{name}, {_skin_phrase(code)}", e["category"]))
    return recs


def build(sources: dict[str, str | Path], keywords_pkg: str | Path | None = None,
          progress: bool = True) -> dict[str, np.ndarray]:
    """Build the arrays. `sources` maps style ("noto", "twemoji", "3d") to a .tgz or unpacked package
    folder; emoji.json is read from the first of noto/twemoji given. Missing images are skipped."""
    from tqdm import tqdm

    unknown = set(sources) - set(STYLE_NAMES)
    if unknown:
        raise ValueError(f"unknown styles {sorted(unknown)}; expected some of {STYLE_NAMES}")
    pkgs = {s: Package(p, ("package/emoji.json", PACKAGES[s][2])) for s, p in sources.items()}
    meta_pkg = next((pkgs[s] for s in ("noto", "twemoji") if s in pkgs), None)
    raw = meta_pkg.read("package/emoji.json") if meta_pkg else None
    if raw is None:
        raise ValueError("emoji.json not found: give a noto or twemoji package holding package/emoji.json")
    keywords = {}
    if keywords_pkg is not None:
        kraw = Package(keywords_pkg).read("package/dist/emoji-en-US.json")
        keywords = json.loads(kraw) if kraw else {}
    recs = _records(json.loads(raw), keywords)
    categories = sorted({r.category for r in recs})

    images, ident, style, cat, prompts, names, codes = [], [], [], [], [], [], []
    for s in STYLE_NAMES:
        if s not in pkgs:
            continue
        folder, ext = PACKAGES[s][2], PACKAGES[s][3]
        for r in tqdm(recs, desc=f"emoji64 {s}", disable=not progress):
            data = pkgs[s].read(folder + r.image + ext)
            if data is None:  # Fluent drops some emoji; try the name without the FE0F selector
                data = pkgs[s].read(folder + r.image.replace("-fe0f", "") + ext)
            if data is None:
                continue
            images.append(_to_rgb64(data))
            ident.append(r.identity)
            style.append(STYLE_NAMES.index(s))
            cat.append(categories.index(r.category))
            prompts.append(f"{r.prompt_name}, {STYLE_PHRASES[s]}")
            names.append(r.name)
            codes.append(r.unified)
    if not images:
        raise ValueError("no images found in the given packages")
    meta = {"format_version": FORMAT_VERSION, "size": SIZE,
            "packages": {s: f"{PACKAGES[s][0]}@{PACKAGES[s][1]}" for s in pkgs},
            "keywords": f"{KEYWORDS_PACKAGE[0]}@{KEYWORDS_PACKAGE[1]}" if keywords else None}
    return {
        "images": np.stack(images),
        "identity": np.asarray(ident, np.int32),
        "style": np.asarray(style, np.int8),
        "category": np.asarray(cat, np.int8),
        "prompts": np.asarray(prompts),
        "names": np.asarray(names),
        "codepoints": np.asarray(codes),
        "category_names": np.asarray(categories),
        "style_names": np.asarray(STYLE_NAMES),
        "meta": np.asarray(json.dumps(meta)),
    }


def save(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # never leave a half-written cache behind
    return path


def load(path: str | Path = DEFAULT_PATH) -> dict[str, np.ndarray]:
    """Load and validate a cached Emoji-64 npz; raises ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build it with `rtlynx data emoji64 --out {path}`")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in REQUIRED_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path} is not an Emoji-64 file (missing {missing})")
        d = {k: z[k] for k in z.files}
    meta = json.loads(str(d["meta"]))
    n = len(d["images"])
    if meta.get("format_version") != FORMAT_VERSION or d["images"].shape[1:] != (SIZE, SIZE, 3) \
            or d["images"].dtype != np.uint8 or any(len(d[k]) != n for k in
                                                     ("identity", "style", "category", "prompts")):
        raise ValueError(f"{path} is an Emoji-64 file of another format or is inconsistent")
    return d


def build_from_npm(out: str | Path = DEFAULT_PATH, npm_cache: str | Path | None = None,
                   force: bool = False, progress: bool = True) -> Path:
    """Fetch the npm packages (cached), build, save. Reuses a valid existing file unless force."""
    out = Path(out)
    if out.exists() and not force:
        load(out)  # raises on a bad file: we never overwrite silently
        return out
    npm_cache = Path(npm_cache) if npm_cache else out.parent / "npm"
    sources = {s: npm_fetch(PACKAGES[s][0], PACKAGES[s][1], npm_cache) for s in STYLE_NAMES}
    kw = npm_fetch(*KEYWORDS_PACKAGE, npm_cache)
    return save(build(sources, kw, progress=progress), out)


def identity_weights(identity: np.ndarray) -> np.ndarray:
    """Per-image sampling weights so that every identity is drawn equally often (sum to 1)."""
    identity = np.asarray(identity)
    _, inv, counts = np.unique(identity, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w / w.sum()


class IdentityBalancedSampler:
    """Infinite sampler of index batches: identity drawn uniformly, then one of its images uniformly.

    Without it 58% of draws would be skin-tone variants of "People & Body" emoji."""

    def __init__(self, identity: np.ndarray, batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.p = identity_weights(identity)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        while True:
            yield self.rng.choice(len(self.p), size=self.batch_size, p=self.p)
