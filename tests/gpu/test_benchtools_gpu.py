"""rtlynx.benchtools on the GPU: graph capture, the L2 flush and input rotation give sane, consistent times.
No speed targets: only that the three ways of timing one matmul agree with each other and with the FLOP count."""

import torch

from rtlynx import benchtools


def test_eager_graph_and_rotated_times_agree():
    m = k = n = 4096
    make = lambda: (lambda a=torch.randn(m, k, device="cuda", dtype=torch.bfloat16),  # noqa: E731
                    b=torch.randn(n, k, device="cuda", dtype=torch.bfloat16): torch.nn.functional.linear(a, b))
    fn = make()
    eager = benchtools.measure(fn, reps=30)
    graph = benchtools.measure(fn, reps=30, graph=True)
    rotated = benchtools.measure(benchtools.rotating(make, 2 * (m * k + n * k)), reps=30)
    assert rotated.input_sets >= 2 and graph.graph and not eager.graph
    for t in (eager, graph, rotated):
        assert 0 < t.min_ms <= t.median_ms <= t.max_ms
        tflops = 2 * m * n * k / (t.median_ms * 1e-3) / 1e12
        assert 50 < tflops < 2000, t  # a bf16 GEMM on a Hopper GPU, not a no-op and not a broken timer
    assert 0.5 < graph.median_ms / eager.median_ms < 2.0
    assert 0.5 < rotated.median_ms / eager.median_ms < 2.0


def test_captured_graph_replays_the_work():
    x = torch.zeros(4, device="cuda")
    replay = benchtools.capture(lambda: x.add_(1), warmup=2)
    assert float(x[0]) == 2  # the warm-up ran eagerly, the capture did not run it
    replay()
    replay()
    torch.cuda.synchronize()
    assert float(x[0]) == 4
