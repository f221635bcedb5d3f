"""CUDA graphs across denoising steps (rtlynx.cudagraphs) on the CPU: the step marker is called once per sampling
step (the real mark is mocked: CUDA-graph trees need a GPU, tests/gpu/test_cudagraph_steps.py runs them), it drives the
step schedule from outside the compiled region (no graph break), and compile / uncompile leave the model as it was."""

import pytest
import torch

import rtlynx
from rtlynx import _compile, cudagraphs, schedule

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from rtlynx import testing  # noqa: E402
from rtlynx.integrations.diffusers import example_inputs, output_tensor, tiny_transformer  # noqa: E402


@pytest.fixture
def marks(monkeypatch):
    calls = []
    monkeypatch.setattr(_compile, "mark_step", lambda: calls.append(1))
    return calls


def _pipe(kind):
    torch.manual_seed(0)
    pipe = {"flux": testing.flux_pipeline, "qwen-image": testing.qwen_image_pipeline}[kind]()
    pipe.set_progress_bar_config(disable=True)
    rtlynx.sparsify(pipe.transformer, backend="reference", speed_rules=False)
    return pipe


def _generate(pipe, steps, **kw):
    with torch.no_grad():
        return pipe(prompt="a red cat", num_inference_steps=steps, height=testing.SIZE, width=testing.SIZE,
                    generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


@pytest.mark.parametrize("kind,calls_per_step", [("flux", 1), ("qwen-image", 2)])  # Qwen-Image: true CFG, 2 calls
def test_one_mark_per_denoising_step(marks, kind, calls_per_step):
    pipe = _pipe(kind)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(1))
    marker = cudagraphs.mark_steps(pipe)
    kw = {"negative_prompt": " ", "true_cfg_scale": 4.0} if kind == "qwen-image" else {}
    _generate(pipe, 3, **kw)
    assert len(marks) == 3 == marker.steps and len(seen) == 3 * calls_per_step
    _generate(pipe, 2, **kw)  # the next image's first step (noise level 1 again) begins a step
    assert len(marks) == 5
    marker.remove()
    _generate(pipe, 2, **kw)
    assert len(marks) == 5 and not hasattr(pipe.transformer, cudagraphs.MARKER)


def test_marker_drives_the_step_schedule_with_one_read_per_call(marks, monkeypatch):
    model = tiny_transformer("flux")
    rtlynx.sparsify(model, backend="reference", dense_below_t=0.5)
    inputs = example_inputs(model)
    reads, dense = [], []
    read = schedule.noise_level
    monkeypatch.setattr(schedule, "noise_level", lambda *a: reads.append(1) or read(*a))
    layer = next(iter(rtlynx.sparse_layers(model).values()))
    layer.register_forward_pre_hook(lambda m, a: dense.append(m._step_gate.dense))
    marker = cudagraphs.mark_steps(model)
    with torch.no_grad():
        for t in (1.0, 0.7, 0.4, 0.1):
            model(**{**inputs, "timestep": torch.full((1,), t)})
    assert dense == [False, False, True, True] and len(reads) == 4 and len(marks) == 4
    gate = schedule.gate_of(model)
    assert gate.external and gate.last_t == pytest.approx(0.1)
    marker.remove()
    assert not gate.external  # the model's own hook reads the level again
    with torch.no_grad():
        model(**{**inputs, "timestep": torch.full((1,), 0.9)})
    assert not gate.dense and len(reads) == 5


@pytest.mark.slow
def test_compiled_forward_has_no_graph_break_and_matches_eager(marks):
    from torch._dynamo.utils import counters

    model = tiny_transformer("flux")
    rtlynx.sparsify(model, backend="reference", lora_rank=4, dense_below_t=0.5)
    inputs = example_inputs(model, batch=2)
    levels = (1.0, 0.6, 0.3)
    with torch.no_grad():
        eager = [output_tensor(model(**{**inputs, "timestep": torch.full((2,), t)})).clone() for t in levels]
    torch._dynamo.reset()
    counters.clear()
    called = cudagraphs.compile(model, mode=None, backend="eager", fullgraph=True)  # the host read stays outside
    assert _compile.is_wrapper(called) and _compile.is_compiled(called)
    with pytest.raises(ValueError, match="compiled already"):
        cudagraphs.compile(called)
    with torch.no_grad():
        got = [output_tensor(called(**{**inputs, "timestep": torch.full((2,), t)})).clone() for t in levels]
    assert sum(counters["graph_break"].values()) == 0 and len(marks) == 3
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cudagraphs.uncompile(called) is model and not schedule.gate_of(model).external
    assert not _compile.is_compiled(model)
    torch._dynamo.reset()


def test_a_module_compiled_in_place_is_marked_outside_its_graph(marks):
    model = tiny_transformer("flux")
    model.compile(backend="eager")
    assert _compile.is_compiled(model) and not _compile.is_wrapper(model)
    marker = cudagraphs.mark_steps(model)
    inputs = example_inputs(model)
    with torch.no_grad():
        for t in (1.0, 1.0, 0.5):  # the second call of a step joins it
            model(**{**inputs, "timestep": torch.full((1,), t)})
    assert len(marks) == 2
    marker.remove()
    assert _compile.uncompile(model) is model and not _compile.is_compiled(model)
    torch._dynamo.reset()


def test_regional_needs_repeated_blocks():
    with pytest.raises(ValueError, match="compile_repeated_blocks"):
        cudagraphs.compile(torch.nn.Linear(4, 4), regional=True)


def test_miniflux_sampler_marks_each_step_when_compiled(marks, monkeypatch, tmp_path):
    from rtlynx.models.miniflux import load_miniflux

    model = load_miniflux(testing.save_tiny_miniflux(tmp_path / "mf"), device="cpu", dtype=torch.float32)
    model.sample(["a cat"], num_steps=2)
    assert not marks  # eager: nothing to mark
    monkeypatch.setattr(_compile, "is_compiled", lambda m: True)
    model.sample(["a cat"], num_steps=3)
    assert len(marks) == 3


def test_runner_compile_and_uncompile(tmp_path, marks):
    from rtlynx.pipelines import StepTimer, load_runner

    runner = load_runner(testing.save_tiny_pipeline("flux", tmp_path / "flux"), device="cpu")
    rtlynx.sparsify(runner.transformer, backend="reference")
    runner.compile(mode=None, backend="eager")
    assert runner.pipe.transformer is runner.called and _compile.is_wrapper(runner.called)
    with StepTimer(runner.called) as timer:
        runner.sample(["a red cat"], steps=2, height=testing.SIZE, width=testing.SIZE, latent=True)
    assert len(timer.steps) == 2 and len(marks) == 2
    runner.uncompile()
    assert runner.pipe.transformer is runner.transformer and runner.called is None
    torch._dynamo.reset()
