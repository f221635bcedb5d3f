"""Seeded fuzzing (bounded in cases and seconds) of the config and LoRA file readers and of the CLI's number flags.

The readers may accept an input or refuse it with ValueError / FileNotFoundError, never another exception (a
TypeError, KeyError or RecursionError is a crash a user would see as a traceback); a refused load leaves the model as
it was. Each test prints its seed; RTLYNX_TEST_SEED reruns it."""

import hashlib
import json
import math
import random
import time

import pytest
import torch

import rtlynx
from rtlynx import io
from rtlynx.integrations.diffusers import tiny_transformer

CASES, SECONDS = 150, 20.0


def _budget(rng_seed):
    print(f"fuzz seed {rng_seed}")
    end = time.monotonic() + SECONDS
    for i in range(CASES):
        if time.monotonic() > end:
            return
        yield i


def _value(rng: random.Random, depth: int = 0):
    """A random JSON-able value, hostile numbers included."""
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 4, 7, 2**31, -(2**63), 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1e-8, 0.5, 1.0, 4.0, -1e308, 1e308, float("nan"), float("inf"), -float("inf")])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(["", "auto", "flux", "none", "norm", "fp8", "../../etc", "*", "a" * 300, "é\u0000"])
    if kind == 4:
        return rng.choice([[], ["*"], ["transformer_blocks.*"], [1, 2]])
    if kind == 5:
        return {}
    if kind == 6:
        return "0" * 64
    if kind == 7:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["n", "m", "x", "lora_rank", "in_features"]): _value(rng, depth + 1) for _ in range(2)}


def _mutate(obj, rng: random.Random):
    """Change, drop or add one field somewhere in a JSON tree (in place)."""
    node, path = obj, []
    while isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(list(node))
        if not isinstance(node[key], dict):
            break
        path.append(key)
        node = node[key]
    if not isinstance(node, dict) or not node:
        return
    key = rng.choice(list(node))
    action = rng.randrange(3)
    if action == 0:
        node[key] = _value(rng)
    elif action == 1:
        del node[key]
    else:
        node[rng.choice(["extra", "colour", "preset", "version"])] = _value(rng)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, lora_rank=4, dense_below_t=0.2)
    for layer in rtlynx.sparse_layers(model).values():
        layer.lora_B.data.normal_()
    return rtlynx.save(model, tmp_path_factory.mktemp("fuzz") / "lynx")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fuzz_config_reader(saved, tmp_path, seed):
    rng = random.Random(seed)
    good = json.loads((saved / io.CONFIG_FILE).read_text())
    lora = (saved / io.LORA_FILE).read_bytes()
    fresh = tiny_transformer("flux")
    before = _state(fresh)
    outcomes = {"loaded": 0, "refused": 0}
    for i in _budget(seed):
        cfg = json.loads(json.dumps(good))
        for _ in range(rng.randrange(1, 4)):
            _mutate(cfg, rng)
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / io.CONFIG_FILE).write_text(json.dumps(cfg))  # NaN / Infinity are written as JSON extensions
        (d / io.LORA_FILE).write_bytes(lora)
        try:
            rtlynx.load(fresh, d)
        except (ValueError, FileNotFoundError) as e:
            assert "\n" not in str(e), str(e)
            assert not rtlynx.sparse_layers(fresh), f"case {i}: refused but changed the model"
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            rtlynx.unsparsify(fresh)
        after = fresh.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"case {i}: base weights changed"
    print(outcomes)
    assert outcomes["refused"] > 0


def test_fuzz_lora_reader(saved, tmp_path, seed):
    """Damaged tensor files under a matching checksum (so the parser, not the checksum, must refuse them)."""
    rng = random.Random(seed)
    good_cfg = json.loads((saved / io.CONFIG_FILE).read_text())
    good = (saved / io.LORA_FILE).read_bytes()
    for i in _budget(seed):
        data = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:  # inside the JSON header: lengths, dtypes, offsets
            n = int.from_bytes(data[:8], "little")
            for _ in range(rng.randrange(1, 4)):
                data[8 + rng.randrange(max(n, 1))] = rng.choice(b'0123456789",:{}[]FBIU')
        else:
            data[:8] = rng.randrange(2**64).to_bytes(8, "little")
        d = tmp_path / f"l{i}"
        d.mkdir()
        cfg = dict(good_cfg, lora_sha256=hashlib.sha256(bytes(data)).hexdigest())
        (d / io.CONFIG_FILE).write_text(json.dumps(cfg))
        (d / io.LORA_FILE).write_bytes(bytes(data))
        fresh = tiny_transformer("flux")
        try:
            rtlynx.load(fresh, d)
        except ValueError as e:
            assert "\n" not in str(e).strip(), str(e)
            assert not rtlynx.sparse_layers(fresh)
        else:  # a flip that left a valid file: the values must be finite
            for layer in rtlynx.sparse_layers(fresh).values():
                assert bool(torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all())


# (command prefix, flag, lowest allowed, integer?, low bound open?)
FLAGS = [
    (["train-lora", "--calib", "c", "--out", "o"], "--rank", 1, True, False),
    (["train-lora", "--calib", "c", "--out", "o"], "--ridge", 0.0, False, False),
    (["calibrate", "--out", "o"], "--batch-size", 1, True, False),
    (["calibrate", "--out", "o"], "--num-prompts", 1, True, False),
    (["calibrate", "--out", "o"], "--save-every", 1, True, False),
    (["calibrate", "--out", "o"], "--max-stats-gb", 0.0, False, True),
    (["generate"], "--steps", 1, True, False),
    (["generate"], "--height", 16, True, False),
    (["generate"], "--guidance", 0.0, False, False),
    (["demo"], "--steps", 1, True, False),
    (["demo"], "--num-prompts", 1, True, False),
    (["analyze"], "--max-tokens", 1, True, False),
    (["select"], "--min-speedup", 0.0, False, True),
]


def test_fuzz_cli_number_ranges(seed, capsys):
    from rtlynx.cli import build_parser

    rng = random.Random(seed)
    parser = build_parser()
    for i in _budget(seed):
        prefix, flag, low, is_int, low_open = rng.choice(FLAGS)
        raw = rng.choice([str(rng.randint(-5, 5)), str(rng.uniform(-3, 3)), "nan", "inf", "-inf", "1e400", "abc",
                          "", "0x10", str(2**70), " 3"])
        try:
            ok_value = float(raw.strip()) if not is_int else int(raw)
        except ValueError:
            ok_value = None
        allowed = (ok_value is not None and math.isfinite(ok_value)
                   and (ok_value > low if low_open else ok_value >= low))
        try:
            args = parser.parse_args([*prefix, flag, raw])
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert e.code == 2 and flag in err, (raw, err)
            assert not allowed, f"{flag} {raw!r} refused: {err}"
        else:
            assert allowed, f"{flag} {raw!r} accepted"
            got = getattr(args, flag.lstrip("-").replace("-", "_"))
            assert got == ok_value
