"""benchmarks/miniflux_select.py's mapping of mini-FLUX sites onto the full-size FLUX rows of the H200 speed table,
and the budget slack of rtlynx.select.select_sites."""

import pytest
import torch

from conftest import load_benchmark
from rtlynx import select


@pytest.fixture(scope="module")
def mapped():
    from rtlynx.pipelines import load_runner

    bench = load_benchmark("miniflux_select")
    runner = load_runner("miniflux", device="cpu", dtype=torch.float32)
    sites = bench.site_shapes(runner)
    h200 = select.load_speed_table(bench.H200_TABLE)
    return sites, h200, *bench.mapped_speed_table(sites, h200)


def test_every_site_gets_its_own_row(mapped):
    sites, _, table, mapping = mapped
    # the mini-FLUX (4 double, 8 single blocks) under flux-all: 8 sites per double block, 2 per single block
    assert len(sites) == 4 * 8 + 8 * 2 == len(mapping)
    for (layers, shape), m in zip(sites, mapping):
        row = select.lookup(table, *shape)
        assert row is not None and (row["M"], row["K"], row["N"]) == shape  # exact, not a neighbour's row
        assert row["role"] == m["role"] and m["layers"] == layers


def _h200_row(h200, m, k, n):
    (row,) = [r for r in h200["rows"] if (r["M"], r["K"], r["N"]) == (m, k, n)]
    return row


@pytest.mark.parametrize("first, mini, flux", [
    # written out by hand: FLUX.1 width 3072, MLP 12288, 4096 image + 512 text tokens; mini-FLUX width 256,
    # MLP 1024, 256 image + 16 text tokens, batch 2 (one prompt with CFG)
    ("transformer_blocks.0.attn.to_q", (512, 256, 768), (4096, 3072, 9216)),
    ("transformer_blocks.2.ff.net.2", (512, 1024, 256), (4096, 12288, 3072)),
    ("transformer_blocks.1.ff_context.net.0.proj", (32, 256, 1024), (512, 3072, 12288)),
    ("transformer_blocks.3.attn.to_add_out", (32, 256, 256), (512, 3072, 3072)),
    ("single_transformer_blocks.5.attn.to_q", (544, 256, 1792), (4608, 3072, 21504)),
    ("single_transformer_blocks.7.proj_out", (544, 1280, 256), (4608, 15360, 3072)),
])
def test_roles_map_to_the_full_size_flux_rows(mapped, first, mini, flux):
    _, h200, table, mapping = mapped
    (m,) = [m for m in mapping if m["layers"][0] == first]
    assert tuple(m["mini_shape"]) == mini and tuple(m["flux_shape"]) == flux
    want = _h200_row(h200, *flux)
    row = select.lookup(table, *mini)
    assert (row["dense_ms"], row["lynx_linear_ms"]) == (want["dense_ms"], want["lynx_linear_ms"])


def test_single_site_holds_qkv_and_mlp_up(mapped):
    sites = dict((layers[0], layers) for layers, _ in mapped[0])
    assert sites["single_transformer_blocks.0.attn.to_q"] == [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]


def test_unknown_role_and_missing_flux_row_are_errors(mapped):
    bench = load_benchmark("miniflux_select")
    with pytest.raises(ValueError, match="no FLUX role"):
        bench.flux_role("transformer_blocks.0.attn.new_layer")
    sites, h200 = mapped[0], mapped[1]
    without = {**h200, "rows": [r for r in h200["rows"] if (r["M"], r["K"], r["N"]) != (4608, 15360, 3072)]}
    with pytest.raises(ValueError, match="no row for FLUX shape"):
        bench.mapped_speed_table(sites, without)


def test_a_set_costing_exactly_the_budget_is_kept_whole():
    # 0.3 + 0.2 + 0.1 and 0.1 + 0.2 + 0.3 differ in the last bit; the budget is the first, the greedy sums the second
    costs = [0.3, 0.2, 0.1]
    budget = sum(costs)
    assert sum(reversed(costs)) > budget  # the case the slack is for
    cands = [select.Candidate([f"l{i}"], 1, 1, 1, 1, c, dense_ms=2.0, sparse_ms=1.0) for i, c in enumerate(costs)]
    # saved per cost: 1/0.3 < 1/0.2 < 1/0.1, so the greedy order is reversed: it sums 0.1 + 0.2 + 0.3
    assert len(select.select_sites(cands, budget)) == 3
    assert len(select.select_sites(cands, budget * 0.99)) == 2
