"""Emoji-64 builder on a tiny fake npm package (offline, no npm)."""
import io
import json
import tarfile

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")

from rtlynx.data import emoji64  # noqa: E402

EMOJI_JSON = [
    {"name": "GRINNING FACE", "short_name": "grinning", "unified": "1F600", "image": "1f600.png",
     "category": "Smileys & Emotion", "sort_order": 1},
    {"name": "FATHER CHRISTMAS", "short_name": "santa", "unified": "1F385", "image": "1f385.png",
     "category": "People & Body", "sort_order": 2,
     "skin_variations": {
         "1F3FB": {"unified": "1F385-1F3FB", "image": "1f385-1f3fb.png"},
         "1F3FF": {"unified": "1F385-1F3FF", "image": "1f385-1f3ff.png"}}},
    {"name": "PEOPLE HOLDING HANDS", "short_name": "people_holding_hands", "unified": "1F9D1-200D-1F91D-200D-1F9D1",
     "image": "1f9d1-200d-1f91d-200d-1f9d1.png", "category": "People & Body", "sort_order": 3,
     "skin_variations": {"1F3FB-1F3FF": {"unified": "X", "image": "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff.png"}}},
]
COLORS = {"1f600": (255, 200, 0), "1f385": (200, 0, 0), "1f385-1f3fb": (250, 220, 180),
          "1f385-1f3ff": (90, 60, 40), "1f9d1-200d-1f91d-200d-1f9d1": (0, 0, 200),
          "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff": (0, 100, 0)}


def _png(color, size, fmt="PNG"):
    im = PIL.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent border -> white after compositing
    im.paste(PIL.new("RGBA", (size // 2, size // 2), color + (255,)), (size // 4, size // 4))
    b = io.BytesIO()
    im.save(b, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return b.getvalue()


def _fake_pkg(root, folder, ext, size, stems, with_json=True):
    base = root / "package"
    (base / folder).mkdir(parents=True)
    if with_json:
        (base / "emoji.json").write_text(json.dumps(EMOJI_JSON))
    for s in stems:
        (base / folder / f"{s}{ext}").write_bytes(_png(COLORS[s], size, "WEBP" if ext == ".webp" else "PNG"))
    return root


@pytest.fixture()
def sources(tmp_path):
    noto = _fake_pkg(tmp_path / "noto", "img/google/64", ".png", 64, COLORS)
    # Fluent drops one emoji; its WebPs are 256x256
    fluent = _fake_pkg(tmp_path / "fluent", "assets", ".webp", 256, [s for s in COLORS if s != "1f600"], False)
    kw = tmp_path / "emojilib" / "package" / "dist"
    kw.mkdir(parents=True)
    (kw / "emoji-en-US.json").write_text(json.dumps({"\U0001F600": ["grinning_face", "smile"]}))
    return {"noto": noto, "3d": fluent}, tmp_path / "emojilib"


def test_build_from_folders(sources, tmp_path):
    src, kw = sources
    d = emoji64.build(src, kw, progress=False)
    assert d["images"].shape == (11, 64, 64, 3) and d["images"].dtype == np.uint8
    prompts = list(d["prompts"])
    assert "grinning face, noto style" in prompts  # emojilib name wins over emoji.json's
    assert "father christmas, dark skin tone, 3d style" in prompts
    assert "people holding hands, light skin tone, dark skin tone, noto style" in prompts
    assert "grinning face, 3d style" not in prompts  # missing in the fake Fluent package: skipped
    # skin-tone variants share the identity of their base emoji
    ident = {p: i for p, i in zip(prompts, d["identity"])}
    assert ident["father christmas, noto style"] == ident["father christmas, light skin tone, 3d style"]
    assert ident["father christmas, noto style"] != ident["grinning face, noto style"]
    assert len(np.unique(d["identity"])) == 3
    assert list(d["category_names"]) == ["People & Body", "Smileys & Emotion"]
    # composited on white, colours kept; the 256 -> 64 resize keeps the centre colour
    i = prompts.index("father christmas, dark skin tone, 3d style")
    assert (d["images"][i, 0, 0] == 255).all()
    assert np.abs(d["images"][i, 32, 32].astype(int) - (90, 60, 40)).max() <= 2
    assert list(d["style_names"]) == ["noto", "twemoji", "3d"]
    assert set(d["style"].tolist()) == {0, 2}


def test_tarball_same_as_folder(sources, tmp_path):
    src, kw = sources
    tgz = tmp_path / "noto.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src["noto"] / "package", arcname="package")
    a = emoji64.build({"noto": src["noto"]}, kw, progress=False)
    b = emoji64.build({"noto": tgz}, kw, progress=False)
    assert np.array_equal(a["images"], b["images"]) and list(a["prompts"]) == list(b["prompts"])


def test_save_load_and_reuse(sources, tmp_path, monkeypatch):
    src, kw = sources
    path = emoji64.save(emoji64.build(src, kw, progress=False), tmp_path / "c" / "e.npz")
    d = emoji64.load(path)
    assert d["images"].shape[0] == 11
    # an existing valid file is reused, never rebuilt (no npm needed)
    monkeypatch.setattr(emoji64, "npm_fetch", lambda *a: pytest.fail("should not fetch"))
    assert emoji64.build_from_npm(path) == path
    # a file that is not Emoji-64 is an error, not silently overwritten
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError):
        emoji64.build_from_npm(bad)
    with pytest.raises(FileNotFoundError):
        emoji64.load(tmp_path / "missing.npz")


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError):
        emoji64.build({"apple": tmp_path})
    with pytest.raises(FileNotFoundError):
        emoji64.build({"noto": tmp_path / "nope"})
    (tmp_path / "empty" / "package").mkdir(parents=True)
    with pytest.raises(ValueError):
        emoji64.build({"noto": tmp_path / "empty"})


def test_identity_balanced_sampler():
    identity = np.array([0] * 18 + [1] * 3 + [2])
    w = emoji64.identity_weights(identity)
    assert np.isclose(w.sum(), 1)
    assert np.allclose([w[identity == k].sum() for k in range(3)], 1 / 3)
    it = iter(emoji64.IdentityBalancedSampler(identity, batch_size=3000, seed=0))
    batch = next(it)
    frac = np.bincount(identity[batch], minlength=3) / len(batch)
    assert np.allclose(frac, 1 / 3, atol=0.04)
    with pytest.raises(ValueError):
        emoji64.IdentityBalancedSampler(identity, 0)


def test_npm_tarballs_are_checked_against_the_pinned_integrity(tmp_path):
    """A cached or freshly packed tarball must be the published one (issue 22: npm pack had no pinned hash)."""
    import base64
    import hashlib

    name, version = emoji64.KEYWORDS_PACKAGE
    tgz = tmp_path / f"{name}-{version}.tgz"
    tgz.write_bytes(b"not the published tarball")
    with pytest.raises(ValueError, match="pinned integrity"):
        emoji64.npm_fetch(name, version, tmp_path)  # cached: npm is not called
    with pytest.raises(ValueError, match="no pinned integrity"):
        emoji64.check_integrity(tgz, "left-pad", "1.3.0")
    fake = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    emoji64.NPM_INTEGRITY[("left-pad", "1.3.0")] = fake  # the same hash the check computes: accepted
    try:
        emoji64.check_integrity(tgz, "left-pad", "1.3.0")
    finally:
        del emoji64.NPM_INTEGRITY[("left-pad", "1.3.0")]
    for (pkg, ver), integrity in emoji64.NPM_INTEGRITY.items():
        assert integrity.startswith("sha512-") and len(base64.b64decode(integrity[7:])) == 64, pkg
    assert {(p[0], p[1]) for p in emoji64.PACKAGES.values()} | {emoji64.KEYWORDS_PACKAGE} == set(emoji64.NPM_INTEGRITY)
