"""Global distillation (rtlynx.distill_global, rtlynx.recording) on a tiny FLUX, CPU reference path: the recorded calls are the
sampler's, the teacher is the dense model, only the LoRA factors train and the model's output error falls; bad
inputs and a non-finite loss end in one-line errors with the LoRA as it was."""

import copy
import dataclasses
import json
import math

import argparse

import pytest
import torch

import rtlynx
from rtlynx import distill_global as G
from rtlynx import recording as R
from rtlynx import schedule
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer


def _model(seed, rank=4, start=1e-3, centre=None):
    dense = tiny_transformer("flux", seed=seed)
    model = copy.deepcopy(dense)
    rtlynx.sparsify(model, lora_rank=rank, backend="reference", speed_rules=False, centre=centre)
    with torch.no_grad():  # a small non-zero start, as a closed-form LoRA would be (0: the norm scale alone)
        for layer in rtlynx.sparse_layers(model).values():
            layer.lora_B.normal_(0, start) if start else layer.lora_B.zero_()
    return dense, model


def _sampler(model, steps=3):
    """A stand-in sampler: ``steps`` transformer calls per prompt batch, noise level falling from 1, each call's input
    the last call's output mixed in (so the student's states differ from the dense model's)."""

    def roll(prompts, seed):
        inputs = example_inputs(model, batch=len(prompts), seed=seed)
        x = inputs.pop("hidden_states")
        for i in range(steps):
            t = torch.full((len(prompts),), 1.0 - i / steps)
            v = output_tensor(model(hidden_states=x, **{**inputs, "timestep": t}))
            x = x - v / steps
        return x

    return roll


def test_rows_and_concatenation_slice_only_batched_tensors(gen):
    b = 5
    x = torch.randn(b, 7, 3, generator=gen)
    ids = torch.randn(7, 3, generator=gen)  # shared (position ids): not sliced
    call = R.Call((x,), {"ids": ids, "t": torch.rand(b, generator=gen), "flag": True}, b, 0.4,
                  target=torch.randn(b, 7, 3, generator=gen))
    idx = torch.tensor([0, 3, 4])
    args, kwargs, target, t = R.rows_of(call, idx)
    assert torch.equal(args[0], x[[0, 3, 4]]) and torch.equal(kwargs["ids"], ids) and kwargs["flag"] is True
    assert torch.equal(kwargs["t"], call.kwargs["t"][[0, 3, 4]]) and torch.equal(target, call.target[[0, 3, 4]])
    assert torch.equal(t, torch.full((3,), 0.4))
    other = R.rows_of(call, torch.tensor([1]))
    a2, k2, tg2, t2 = R.cat_rows([(args, kwargs, target, t), other])
    assert torch.equal(a2[0], x[[0, 3, 4, 1]]) and torch.equal(k2["ids"], ids) and tg2.shape[0] == 4


def test_position_ids_stay_whole_when_the_batch_equals_the_token_count(gen):
    # FLUX's img_ids are [tokens, 3]: with a batch as large as the token count (128 prompts x CFG on the
    # mini-FLUX's 256 tokens) they must still not be sliced (the device run of 2026-12-07 crashed on this)
    b = n = 6
    x = torch.randn(b, n, 4, generator=gen)
    img_ids, txt_ids = torch.randn(n, 3, generator=gen), torch.randn(b, 3, generator=gen)
    call = R.Call((), {"hidden_states": x, "img_ids": img_ids, "txt_ids": txt_ids,
                       "timestep": torch.rand(b, generator=gen)}, b, 0.3, target=torch.randn(b, n, 4, generator=gen))
    one = R.rows_of(call, torch.tensor([1, 4]))
    assert torch.equal(one[1]["img_ids"], img_ids) and torch.equal(one[1]["txt_ids"], txt_ids)
    assert torch.equal(one[1]["hidden_states"], x[[1, 4]])
    two = R.rows_of(call, torch.tensor([0, 2, 3, 5]))  # 2 + 4 rows: 6, the token count again
    _, kw, tg, _ = R.cat_rows([one, two])
    assert torch.equal(kw["img_ids"], img_ids) and torch.equal(kw["txt_ids"], txt_ids)
    assert torch.equal(kw["hidden_states"], x[[1, 4, 0, 2, 3, 5]]) and torch.equal(tg, call.target[[1, 4, 0, 2, 3, 5]])


def test_t_weights_closed_form():
    t = torch.tensor([0.0, 0.5, 1.0, -1.0])
    assert torch.equal(G.t_weights(t, "uniform"), torch.ones(4))
    assert torch.allclose(G.t_weights(t, "late"), torch.tensor([4.0, 2.5, 1.0, 1.0]))
    assert torch.allclose(G.t_weights(t, "early"), torch.tensor([1.0, 2.5, 4.0, 1.0]))


def test_recorded_teacher_is_the_dense_model(seed):
    dense, model = _model(seed)
    roll = _sampler(model)
    calls = R.record_round(model, roll, ["a", "b"], 7, "student")
    assert len(calls) == 3 and all(c.rows == 2 for c in calls)
    assert [round(c.t, 4) for c in calls] == [1.0, round(2 / 3, 4), round(1 / 3, 4)]
    for c in calls:  # the target is the untouched dense model's output at the student's state
        want = output_tensor(dense(*c.args, **c.kwargs))
        torch.testing.assert_close(c.target, want, rtol=1e-5, atol=1e-5)


def test_dense_rollout_keeps_its_own_outputs_as_targets(seed):
    dense, model = _model(seed)
    roll = _sampler(model)
    n = {"calls": 0}
    h = model.register_forward_pre_hook(lambda *a: n.__setitem__("calls", n["calls"] + 1))
    calls = R.record_round(model, roll, ["a", "b"], 7, "dense")
    h.remove()
    assert len(calls) == 3 and n["calls"] == 3  # the sampler's calls only: none run again for the targets
    for c in calls:  # the kept output is the untouched dense model's output at the dense sampler's state
        want = output_tensor(dense(*c.args, **c.kwargs))
        torch.testing.assert_close(c.target, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("centre", [None, "token_mean"])
def test_training_lowers_the_output_error_and_touches_only_the_lora(seed, tmp_path, centre):
    """(with token-mean centring too: the gradient reaches the LoRA through x - c and the LoRA of c)"""
    torch.manual_seed(seed)
    dense, model = _model(seed, start=0, centre=centre)
    roll = _sampler(model)
    prompts = ["a", "b", "c", "d"]
    # the states the run trains on (dense sampler, its first rollout's seed): the optimisation must lower their error
    val = R.record_round(model, roll, prompts, seed + 1000, "dense")
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora0 = {k: v.detach().clone() for k, v in G.lora_parameters(model).items()}
    before = R.velocity_error(model, val)
    cfg = G.GlobalConfig(steps=20, lr=1e-2, warmup=0, batch=8, calls_per_batch=3, rollout_prompts=4, refresh=100,
                         states="dense", eval_every=10, save_every=10, seed=seed)
    rep = G.train_global(model, roll, prompts, cfg, val_calls=val, checkpoint=tmp_path / "ck", progress=False,
                         log=lambda *a: None)
    after = R.velocity_error(model, val)
    assert after < 0.8 * before, (before, after)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k
    assert any(not torch.equal(p, lora0[k]) for k, p in G.lora_parameters(model).items())
    assert all(p.grad is None and p.requires_grad for p in G.lora_parameters(model).values())
    assert all(p.requires_grad for p in model.parameters())  # the flags as they were
    assert [r["step"] for r in rep["history"] if "val_rel_err" in r] == [0, 10, 20]
    # the checkpoint's LoRA loads on a fresh model and gives the trained outputs
    fresh = copy.deepcopy(dense)
    rtlynx.load(fresh, tmp_path / "ck" / "lora")
    rtlynx.configure(fresh, backend="reference", speed_rules=False)
    assert rtlynx.config_of(fresh).centre == centre
    inp = example_inputs(model, batch=2, seed=seed)
    torch.testing.assert_close(output_tensor(fresh(**inp)), output_tensor(model(**inp)), rtol=0, atol=0)


def test_resume_continues_from_the_checkpoint(seed, tmp_path):
    _, model = _model(seed)
    roll = _sampler(model)
    cfg = G.GlobalConfig(steps=4, batch=4, calls_per_batch=2, rollout_prompts=2, refresh=10, save_every=2,
                         eval_every=10, seed=seed, warmup=0)
    G.train_global(model, roll, ["a", "b"], cfg, checkpoint=tmp_path, progress=False, log=lambda *a: None)
    trained = {k: p.detach().clone() for k, p in G.lora_parameters(model).items()}
    meta = json.loads((tmp_path / G.STATE_META).read_text())
    assert meta["step"] == 4
    _, other = _model(seed + 1)  # another start: resuming must replace it with the checkpoint's state
    logs = []
    cfg6 = G.GlobalConfig(**{**cfg.__dict__, "steps": 6})
    rep = G.train_global(other, _sampler(other), ["a", "b"], cfg6, checkpoint=tmp_path, resume=True,
                         progress=False, log=logs.append)
    assert any("resumed" in str(m) and "step 4" in str(m) for m in logs)
    assert [r["step"] for r in rep["history"] if "train_rel_err" in r][-2:] == [5, 6]
    moved = [float((p - trained[k]).abs().max()) for k, p in G.lora_parameters(other).items()]
    assert max(moved) < 0.05  # two small steps from the checkpoint, not from the other start
    # other training settings than the checkpoint's: refused in one line, the model's LoRA untouched
    now = {k: p.detach().clone() for k, p in G.lora_parameters(other).items()}
    for change in (dict(lr=5e-4), dict(dense_below_t=0.2), dict(t_weight="late")):
        with pytest.raises(G.DistillError, match="other settings .*" + next(iter(change))):
            G.train_global(other, _sampler(other), ["a", "b"], dataclasses.replace(cfg6, steps=8, **change),
                           checkpoint=tmp_path, resume=True, progress=False, log=lambda *a: None)
        assert all(torch.equal(p, now[k]) for k, p in G.lora_parameters(other).items())


def test_non_finite_loss_restores_the_starting_lora(seed, monkeypatch):
    _, model = _model(seed)
    start = {k: p.detach().clone() for k, p in G.lora_parameters(model).items()}

    def poisoned(*a, **k):  # the teacher's outputs turned NaN: the first loss is not finite
        calls = R.record_round(*a, **k)
        for c in calls:
            c.target = torch.full_like(c.target, float("nan"))
        return calls

    monkeypatch.setattr(G, "record_round", poisoned)
    cfg = G.GlobalConfig(steps=3, batch=4, calls_per_batch=2, rollout_prompts=2, seed=seed, warmup=0)
    with pytest.raises(G.DistillError, match="non-finite loss"):
        G.train_global(model, _sampler(model), ["a"], cfg, progress=False, log=lambda *a: None)
    for k, p in G.lora_parameters(model).items():
        assert torch.equal(p, start[k]), k


def test_bad_inputs_are_one_line_errors(seed, tmp_path):
    dense = tiny_transformer("flux", seed=seed)
    rtlynx.sparsify(dense, backend="reference")  # no LoRA
    with pytest.raises(G.DistillError, match="no compensation LoRA"):
        G.train_global(dense, lambda p, s: None, ["a"], G.GlobalConfig(steps=1), progress=False)
    _, model = _model(seed)
    with pytest.raises(G.DistillError, match="no training prompts"):
        G.train_global(model, lambda p, s: None, [], G.GlobalConfig(steps=1), progress=False)
    with pytest.raises(G.DistillError, match="nothing to resume"):
        G.train_global(model, lambda p, s: None, ["a"], G.GlobalConfig(steps=1), checkpoint=tmp_path, resume=True,
                       progress=False)
    for bad in (dict(steps=0), dict(lr=float("nan")), dict(lr=-1.0), dict(states="x"), dict(t_weight="x"),
                dict(batch=1.5), dict(warmup=-1), dict(dense_below_t=0.0), dict(dense_below_t=1.5),
                dict(dense_below_t=True), dict(dense_below_t="0.2")):
        with pytest.raises(ValueError):
            G.GlobalConfig(**bad)


def test_training_for_a_schedule_leaves_its_dense_steps_out(seed, monkeypatch):
    """dense_below_t: the rollouts run the schedule (the call below it dense), its calls never reach a batch, the
    model's own schedule is back afterwards; a schedule under which no call runs sparse is a one-line error."""
    _, model = _model(seed)
    roll = _sampler(model)  # calls at t = 1, 2/3, 1/3
    gates = []

    def watched(prompts, s):  # what the step gate decided at each call of the rollouts
        h = model.register_forward_hook(lambda *a: gates.append(schedule.gate_of(model).dense))
        try:
            return roll(prompts, s)
        finally:
            h.remove()

    drawn = []
    real_rows_of = G.rows_of
    monkeypatch.setattr(G, "rows_of", lambda c, idx: (drawn.append(c.t), real_rows_of(c, idx))[1])
    cfg = G.GlobalConfig(steps=4, warmup=0, batch=4, calls_per_batch=3, rollout_prompts=2, refresh=2, eval_every=100,
                         seed=seed, dense_below_t=0.5)
    G.train_global(model, watched, ["a", "b", "c"], cfg, progress=False, log=lambda *a: None)
    assert gates == [False, False, True] * 2  # two rollouts, the last call of each dense
    assert drawn and min(drawn) >= 0.5 and len(set(drawn)) == 2  # t = 1 and 2/3 only
    assert rtlynx.config_of(model).dense_below_t is None and schedule.gate_of(model) is None
    # the same run without the option draws the t = 1/3 call too
    drawn.clear()
    G.train_global(model, roll, ["a", "b", "c"], dataclasses.replace(cfg, dense_below_t=None), progress=False,
                   log=lambda *a: None)
    assert min(drawn) < 0.5

    def low(prompts, s):  # a sampler whose only call is below the schedule's level
        inputs = example_inputs(model, batch=len(prompts), seed=s)
        return output_tensor(model(**{**inputs, "timestep": torch.full((len(prompts),), 0.3)}))

    lora = {k: p.detach().clone() for k, p in G.lora_parameters(model).items()}
    with pytest.raises(G.DistillError, match="no recorded call runs sparse"):
        G.train_global(model, low, ["a"], dataclasses.replace(cfg, steps=1), progress=False, log=lambda *a: None)
    assert all(torch.equal(p, lora[k]) for k, p in G.lora_parameters(model).items())
    assert rtlynx.config_of(model).dense_below_t is None


def test_cli_global_objective_end_to_end(seed, tmp_path):
    """`train-lora --objective global` on a tiny mini-FLUX: from --init, a checkpoint, a resumable run, a save that
    loads; a wrong start is a one-line error."""
    from rtlynx import cli, io
    from rtlynx.models.miniflux import load_miniflux
    from rtlynx.testing import save_tiny_miniflux

    model_dir = save_tiny_miniflux(tmp_path / "mf", seed)
    m = load_miniflux(model_dir)
    rtlynx.sparsify(m.transformer, lora_rank=2)
    rtlynx.save(m.transformer, tmp_path / "init")
    out = tmp_path / "g"
    args = ["train-lora", "--objective", "global", "--model", str(model_dir), "--init", str(tmp_path / "init"),
            "--prompts-file", str(model_dir / "prompts.txt"), "--steps", "2", "--train-steps", "3",
            "--rollout-prompts", "2", "--batch-rows", "4", "--device", "cpu", "--out", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["objective"] == "global" and [r["step"] for r in report["history"] if "train_rel_err" in r] == [1, 2, 3]
    meta, tensors = io.read(out)
    assert meta["config"]["dense_below_t"] == 0.2 and all(torch.isfinite(t).all() for t in tensors.values())
    assert (out / "checkpoint" / G.STATE_META).is_file()
    # --resume with more steps continues from the checkpoint's step 3
    more = [a if a != "3" else "5" for a in args] + ["--resume"]
    assert cli.main(more) == 0
    steps = [r["step"] for r in json.loads((out / "distill_report.json").read_text())["history"] if "train_rel_err" in r]
    assert steps == [1, 2, 3, 4, 5]
    with pytest.raises(SystemExit, match="--init DIR"):
        cli.main([a for a in args if a not in ("--init", str(tmp_path / "init"))] + ["--overwrite"])
    # --grow-rank: the saved LoRA has the new rank
    grown = tmp_path / "g4"
    assert cli.main([a if a != str(out) else str(grown) for a in args] + ["--grow-rank", "4"]) == 0
    meta, tensors = io.read(grown)
    assert {v["lora_rank"] for v in meta["layers"].values()} == {4}
    # --grow-rank fill: each layer at 64 // its site's members (the tiny mini-FLUX has 1-, 3- and 4-member sites)
    filled = tmp_path / "gfill"
    assert cli.main([a if a != str(out) else str(filled) for a in args] + ["--grow-rank", "fill"]) == 0
    meta, _ = io.read(filled)
    from rtlynx.sites import model_sites
    members = {id(l): len(s.layers) for s in model_sites(m.transformer) for l in s.layers}
    names = rtlynx.sparse_layers(m.transformer)
    want = {n: min(64 // members[id(l)], l.in_features, l.out_features) for n, l in names.items()}
    assert {n: v["lora_rank"] for n, v in meta["layers"].items()} == want
    with pytest.raises(SystemExit):
        cli.main(args + ["--grow-rank", "full", "--overwrite"])
    # --train-for-schedule: the saved schedule in the training's config; without a schedule a one-line error
    sched = tmp_path / "gs"
    assert cli.main([a if a != str(out) else str(sched) for a in args] + ["--train-for-schedule"]) == 0
    assert json.loads((sched / "distill_report.json").read_text())["config"]["dense_below_t"] == 0.2
    with pytest.raises(SystemExit, match="needs a schedule"):
        cli.main(args + ["--train-for-schedule", "--dense-below-t", "none", "--overwrite"])


def test_training_steps_run_without_cudnn_attention(seed):
    # cuDNN attention's backward failed on an H100 (2026-12-07) where the memory-efficient kernel trains: the
    # training forward and backward exclude it; rollouts and the caller's flags afterwards are untouched
    _, model = _model(seed)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                                  torch.backends.cuda.flash_sdp_enabled())))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        G.train_global(model, _sampler(model), ["a", "b"], G.GlobalConfig(steps=2, batch=2, calls_per_batch=2,
                       rollout_prompts=2, eval_every=100, save_every=100), progress=False, log=lambda *a: None)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    train = [s for s in seen if s[0]]
    assert len(train) == 2 and all(not cudnn and flash for _, cudnn, flash in train)
    assert any(cudnn for grad, cudnn, _ in seen if not grad)  # the rollouts keep the caller's choice


def test_endpoint_target_closed_form(gen):
    # target = v_s + w ((v_d + (x_s - x_d) / max(t, floor)) - v_s), recomputed here from the definitions
    model = tiny_transformer("flux", seed=0)
    ts = [0.9, 0.5, 0.05]  # the last below the floor (0.1)
    def calls(x):
        return [R.Call((), {"hidden_states": x[i], "timestep": torch.full((2,), t)}, 2, t,
                       target=torch.randn(2, 5, 3, generator=gen)) for i, t in enumerate(ts)]
    xs, xd = torch.randn(3, 2, 5, 3, generator=gen), torch.randn(3, 2, 5, 3, generator=gen)
    student, dense = calls(xs), calls(xd)
    v_s = [c.target.clone() for c in student]
    R.endpoint_targets(model, student, dense, weight=0.5)
    for i, t in enumerate(ts):
        want = v_s[i] + 0.5 * (dense[i].target + (xs[i] - xd[i]) / max(t, 0.1) - v_s[i])
        torch.testing.assert_close(student[i].target, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="calls"):
        R.endpoint_targets(model, calls(xs), calls(xd)[:2])
    other = calls(xd)
    other[1].t = 0.4
    with pytest.raises(ValueError, match="call 1"):
        R.endpoint_targets(model, calls(xs), other)
    with pytest.raises(ValueError, match="flow-matching"):
        R.endpoint_targets(tiny_transformer("z-image", seed=0), calls(xs), calls(xd))


def test_endpoint_target_of_a_dense_student_is_the_velocity_target(seed):
    # a student that runs dense reaches the dense states: nothing to pull back, the targets stay bit for bit
    _, model = _model(seed)
    roll = _sampler(model)
    rtlynx.configure(model, mode="dense")
    student = R.record_round(model, roll, ["a", "b"], 3, "student")
    want = [c.target.clone() for c in student]
    R.endpoint_targets(model, student, R.record_round(model, roll, ["a", "b"], 3, "dense"))
    assert all(torch.equal(c.target, w) for c, w in zip(student, want))


def test_endpoint_training_runs_and_is_validated(seed):
    _, model = _model(seed)
    cfg = G.GlobalConfig(steps=2, batch=2, calls_per_batch=2, rollout_prompts=2, eval_every=100, save_every=100,
                         target="endpoint", endpoint_weight=0.5)
    rep = G.train_global(model, _sampler(model), ["a", "b"], cfg, progress=False, log=lambda *a: None)
    assert all(math.isfinite(r["train_rel_err"]) for r in rep["history"] if "train_rel_err" in r)
    with pytest.raises(ValueError, match="states='student'"):
        G.GlobalConfig(target="endpoint", states="dense")
    with pytest.raises(ValueError, match="endpoint_weight"):
        G.GlobalConfig(target="endpoint", endpoint_weight=-1)
    z = tiny_transformer("z-image", seed=seed)
    rtlynx.sparsify(z, lora_rank=2, backend="reference", speed_rules=False)
    with pytest.raises(G.DistillError, match="flow-matching"):
        G.train_global(z, lambda p, s: None, ["a"], cfg, progress=False, log=lambda *a: None)


def test_grow_lora_rank_keeps_the_output_and_adds_capacity(seed):
    """grow_lora_rank: every LoRA reaches the new rank, the old factors sit in the first rows / columns, the new B
    columns are zero so the model's output is the same bit for bit, the new A rows are not (capacity to train), and a
    second grow to a smaller rank changes nothing."""
    _, model = _model(seed, rank=4, start=1e-2)
    inp = example_inputs(model, batch=2, seed=seed)
    with torch.no_grad():
        before = output_tensor(model(**inp)).clone()
    old = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in rtlynx.sparse_layers(model).items()}
    assert G.grow_lora_rank(model, 8, seed=seed) == len(old)
    for name, layer in rtlynx.sparse_layers(model).items():
        a, b = old[name]
        assert layer.lora_rank == 8 and layer.lora_A.shape == (8, a.shape[1]) and layer.lora_B.shape == (b.shape[0], 8)
        assert torch.equal(layer.lora_A[:4], a) and torch.equal(layer.lora_B[:, :4], b)
        assert not bool((layer.lora_B[:, 4:] != 0).any()) and bool((layer.lora_A[4:] != 0).any())
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**inp)), before)
    assert G.grow_lora_rank(model, 6, seed=seed) == 0


def test_grow_lora_rank_fill_gives_each_site_one_tail_segment(seed):
    """rank="fill": each member of an n-member site reaches the largest rank r with n * r <= 64 (checked by brute
    force, not by the formula), every site's tail stays one 64-row segment (what rank 4 takes), the output is the
    same (to fp32 summation order), and a bad rank is refused."""
    from rtlynx.sites import model_sites
    from rtlynx.validate import arg_rank_or_fill

    _, model = _model(seed, rank=4, start=1e-2)
    inp = example_inputs(model, batch=2, seed=seed)
    with torch.no_grad():
        before = output_tensor(model(**inp)).clone()
    sites = model_sites(model)
    assert {len(s.layers) for s in sites} >= {1, 3}, "the tiny FLUX should have single- and multi-member sites"
    rp_before = {id(s): s.rp for s in sites}
    assert G.grow_lora_rank(model, "fill", seed=seed) == len(rtlynx.sparse_layers(model))
    for s in model_sites(model):
        n = len(s.layers)
        want = max(r for r in range(1, 200) if n * r <= 64)
        assert all(l.lora_rank == want for l in s.layers), (n, [l.lora_rank for l in s.layers])
        assert s.rp == rp_before[id(s)] == 64
    with torch.no_grad():  # the zero B columns add exact zeros, but a wider product may sum in another order
        torch.testing.assert_close(output_tensor(model(**inp)), before, rtol=1e-5, atol=1e-6)
    for bad in ("full", 0, -3, True):
        with pytest.raises(ValueError, match="positive int or 'fill'"):
            G.grow_lora_rank(model, bad)
    assert arg_rank_or_fill()("fill") == "fill" and arg_rank_or_fill()("16") == 16 and arg_rank_or_fill(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="'fill'"):
        arg_rank_or_fill()("0")
