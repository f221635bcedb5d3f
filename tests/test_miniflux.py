import pytest
import torch

pytest.importorskip("diffusers")

from rtlynx.models.miniflux import MiniFlux, WordTokenizer, image_grid, load_miniflux, to_uint8  # noqa: E402

TINY = {"width": 64, "head_dim": 32, "axes_dims_rope": [8, 12, 12], "num_layers": 1, "num_single_layers": 1,
        "text_width": 32, "text_layers": 1, "text_heads": 2, "num_steps": 2}
PROMPTS = ["grinning face, noto style", "red heart, 3d style", "dog face, medium skin tone, twemoji style"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniFlux(TINY, WordTokenizer.fit(PROMPTS, max_len=8)).eval()


def test_tokenizer_roundtrip_and_null_prompt():
    tok = WordTokenizer.fit(PROMPTS, max_len=6)
    ids = tok.encode(["red heart, 3d style", "", "unknownword heart a b c d e f"])
    assert ids.shape == (3, 6)
    assert ids[0, 0] == tok.CLS and ids[0, 1] == tok.index["red"]
    assert ids[1].tolist() == [tok.CLS] + [tok.PAD] * 5  # null prompt
    assert ids[2, 1] == tok.UNK and (ids[2] != tok.PAD).all()  # truncated to max_len
    tok2 = WordTokenizer.from_json(tok.to_json())
    assert tok2.vocab == tok.vocab and torch.equal(tok2.encode(PROMPTS), tok.encode(PROMPTS))
    with pytest.raises(ValueError):
        WordTokenizer.from_json('{"type": "other"}')


def test_patchify_roundtrip(model):
    x = torch.randn(2, 3, 64, 64)
    t = model.patchify(x)
    assert t.shape == (2, 256, 48)
    assert torch.equal(model.unpatchify(t), x)
    # a patch token holds one 4x4x3 block
    assert torch.equal(t[0, 1].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])


def test_forward_shapes_and_loss(model):
    x = torch.randn(3, 256, 48)
    text = model.encode_text(PROMPTS)
    assert text[0].shape == (3, 8, 32) and text[1].shape == (3, 32)
    v = model(x, torch.rand(3), text)
    assert v.shape == x.shape
    loss = model.loss(torch.rand(3, 3, 64, 64) * 2 - 1, model.tokenizer.encode(PROMPTS))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.text_encoder.tok.weight.grad is not None  # text encoder trains jointly


def test_sampling_runs_and_is_deterministic(model):
    a = model.sample(PROMPTS[:2], num_steps=2, guidance_scale=3.0, seed=1)
    b = model.sample(PROMPTS[:2], num_steps=2, guidance_scale=3.0, seed=1)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    c = model.sample(PROMPTS[:1], num_steps=2, guidance_scale=1.0, seed=1)
    assert c.shape == (1, 3, 64, 64)
    u8 = to_uint8(a)
    assert u8.shape == (2, 64, 64, 3) and u8.dtype == torch.uint8
    assert image_grid(u8.numpy(), nrow=1).size == (2 * 66 + 2, 66 + 2)


def test_save_load_roundtrip_exact(model, tmp_path):
    x, t = torch.randn(2, 256, 48), torch.rand(2)
    # fp32 files: bit-exact
    paths = model.save_pretrained(tmp_path / "fp32", dtype=None, max_shard_mb=0.2)
    assert len(paths) > 1  # sharded
    m2 = load_miniflux(tmp_path / "fp32")
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(model(x, t, model.encode_text(PROMPTS[:2])), m2(x, t, m2.encode_text(PROMPTS[:2])))
    # fp16 files (as shipped): exactly the fp16-rounded weights
    model.save_pretrained(tmp_path / "fp16")
    m3 = MiniFlux.from_pretrained(tmp_path / "fp16")
    for k, v in model.state_dict().items():
        assert torch.equal(v.half().float(), m3.state_dict()[k]), k
    assert m3.config == m2.config and m3.tokenizer.vocab == model.tokenizer.vocab


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError):
        MiniFlux({"width": 60, "head_dim": 32}, WordTokenizer.fit(PROMPTS))
    with pytest.raises(ValueError):
        MiniFlux(TINY, None)
    with pytest.raises(FileNotFoundError):
        load_miniflux(tmp_path)


def test_train_few_steps_and_resume(tmp_path):
    """The trainer runs on CPU, checkpoints, resumes exactly, and initialises from EMA weights."""
    np = pytest.importorskip("numpy")
    from rtlynx.data import emoji64
    from rtlynx.train.reference import TrainConfig, plot_loss, train

    rng = np.random.default_rng(0)
    n = 6
    arrays = {"images": rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
              "identity": np.array([0, 0, 1, 1, 2, 2], np.int32), "style": np.zeros(n, np.int8),
              "category": np.zeros(n, np.int8), "prompts": np.array(PROMPTS * 2), "names": np.array(PROMPTS * 2),
              "codepoints": np.array(["1F600"] * n), "category_names": np.array(["Smileys"]),
              "style_names": np.array(emoji64.STYLE_NAMES),
              "meta": np.array('{"format_version": %d}' % emoji64.FORMAT_VERSION)}
    data = emoji64.save(arrays, tmp_path / "d.npz")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), minutes=10, max_steps=2, batch_size=2,
                      warmup_steps=1, log_every=1, model=dict(TINY))
    res = train(cfg, progress=False)
    assert res["state"]["step"] == 2 and len(res["state"]["history"]) == 2
    cfg.max_steps = 3
    res = train(cfg, resume=True, progress=False)
    assert res["state"]["step"] == 3
    res2 = train(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "run2"), "max_steps": 4}),
                 init=str(tmp_path / "run" / "ema"), progress=False)
    assert res2["state"]["step"] == 4
    plot_loss(tmp_path / "run" / "loss.json", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
