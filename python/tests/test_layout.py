"""Piece tables read from tensor shapes and strides match the bytes torch indexes, for every
vLLM KV layout (no layout is hard-coded in the connector)."""

import ctypes

import pytest

torch = pytest.importorskip("torch")

from cwm_vllm.layout import LayoutError, describe, layer_order, layout_request  # noqa: E402

NB, BS, H, D, L = 12, 16, 2, 32, 3


def storage_bytes(region, off, n):
    return ctypes.string_at(region.base + off, n)


def layouts():
    dt = torch.bfloat16
    # vLLM CPU: [num_blocks, H, N, 2D] per layer, all layers views of one buffer (LBHNC).
    buf = torch.randn(L, NB, H, BS, 2 * D).to(dt)
    yield "cpu-lbhnc", [buf[i] for i in range(L)], ["kv"]
    # FlashAttention (2, num_blocks, N, H, D) per layer, separate allocations.
    yield "flash-2nbhd", [torch.randn(2, NB, BS, H, D).to(dt) for _ in range(L)], ["k", "v"]
    # (num_blocks, 2, N, H, D) per layer (FlashInfer).
    yield "flash-n2bhd", [torch.randn(NB, 2, BS, H, D).to(dt) for _ in range(L)], ["kv"]
    # Cross-layer BLHNC: one buffer, block-major; per-layer views have block stride L*page.
    cross = torch.randn(NB, L, H, BS, 2 * D).to(dt)
    yield "cross-blhnc", [cross[:, i] for i in range(L)], ["kv"]
    # MLA: (num_blocks, N, latent).
    yield "mla", [torch.randn(NB, BS, 576).to(dt) for _ in range(L)], ["kv"]


@pytest.mark.parametrize("name,tensors,kinds", list(layouts()), ids=[x[0] for x in layouts()])
def test_pieces_hold_exactly_each_blocks_bytes(name, tensors, kinds):
    d = describe(tensors, NB)
    assert len(d.pieces) == L * len(kinds)
    for b in [0, 1, 7, NB - 1]:
        got = b"".join(
            storage_bytes(d.regions[p["tensor"]], p["offset"] + b * p["block_stride"], p["len"])
            for p in d.pieces)
        want = b""
        for t in tensors:
            sl = t[:, b] if t.shape[0] == 2 and t.shape[1] == NB else t[b]
            for part in (sl if sl.shape[0] == 2 and len(kinds) == 2 else [sl]):
                want += part.contiguous().view(torch.uint8).numpy().tobytes()
        assert got == want, f"{name}: block {b}"
    assert [p["kind"] for p in d.pieces[: len(kinds)]] == kinds
    req = layout_request(d, layers=L, block_size=BS, heads=H, head=D, name=name)
    assert req["kind"] == "pieces" and req["dtype"] == "bfloat16" and req["inner"] == "opaque"


def test_a_permuted_but_dense_block_slab_is_accepted():
    """FlashInfer's HND cache: an NHD-shaped view, (num_blocks, 2, N, H, D), of memory laid out
    (num_blocks, 2, H, N, D). Each block is still one dense range: its bytes move whole."""
    phys = [torch.randn(NB, 2, H, BS, D).to(torch.bfloat16) for _ in range(L)]
    views = [p.permute(0, 1, 3, 2, 4) for p in phys]
    assert views[0].shape == (NB, 2, BS, H, D) and not views[0].is_contiguous()
    d = describe(views, NB)
    assert [p["kind"] for p in d.pieces] == ["kv"] * L
    for b in [0, 5, NB - 1]:
        for p, t in zip(d.pieces, phys):
            got = storage_bytes(d.regions[p["tensor"]], p["offset"] + b * p["block_stride"],
                                p["len"])
            assert got == t[b].contiguous().view(torch.uint8).numpy().tobytes()


def test_non_contiguous_block_slab_is_refused():
    t = torch.randn(BS, NB, H, D).transpose(0, 1)  # block dim first, but strided inside
    with pytest.raises(LayoutError, match="not contiguous"):
        describe([t], NB)


def test_no_block_dimension_is_refused():
    with pytest.raises(LayoutError, match="no block dimension"):
        describe([torch.zeros(3, 5)], NB)


def test_layers_sorted_by_index():
    names = ["model.layers.10.attn", "model.layers.2.attn", "model.layers.1.attn"]
    assert layer_order(names) == ["model.layers.1.attn", "model.layers.2.attn", "model.layers.10.attn"]


def test_kernel_blocks_grouped_into_cache_blocks():
    # vLLM may view each cache block as 2 kernel blocks of half the tokens: (NB*2, H, BS/2, C).
    t = torch.randn(NB * 2, H, BS // 2, 2 * D).to(torch.bfloat16)
    d = describe([t], NB)
    (p,) = d.pieces
    assert p["len"] == 2 * H * (BS // 2) * 2 * D * 2 and p["block_stride"] == p["len"]
    for b in [0, 5, NB - 1]:
        got = storage_bytes(d.regions[0], p["offset"] + b * p["block_stride"], p["len"])
        assert got == t[2 * b: 2 * b + 2].contiguous().view(torch.uint8).numpy().tobytes()
    # Not contiguous across the kernel blocks of one cache block: refused.
    with pytest.raises(LayoutError, match="kernel blocks"):
        describe([torch.randn(NB * 2, 2 * 64)[:, :64]], NB)
