"""Describes an engine's KV tensors to cwm: the piece table read from their shapes, strides and
shared storage, so no vLLM layout is hard-coded (docs/PROTOCOL.md, layout kind ``pieces``).

A *region* is one storage (allocation) the tensors live in; a *piece* is the bytes of one
(layer, K/V) of one block: region byte ``offset + block * block_stride``, ``len`` bytes,
contiguous. Works on anything shaped like a torch tensor (``shape``, ``stride()``,
``element_size()``, ``data_ptr()``, ``untyped_storage()``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence


class LayoutError(ValueError):
    """The tensors cannot be described as whole-block pieces."""


@dataclass
class Region:
    base: int
    nbytes: int
    storage: Any = None


@dataclass
class Described:
    regions: list[Region] = field(default_factory=list)
    pieces: list[dict] = field(default_factory=list)
    num_blocks: int = 0
    dtype: str = ""


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names sorted by their layer index (``model.layers.12.self_attn.attn`` → 12),
    keeping the given order where no index is found."""
    def key(item: tuple[int, str]) -> tuple[int, int]:
        i, n = item
        m = re.findall(r"\.(\d+)\.", "." + n + ".")
        return (int(m[0]) if m else i, i)
    return [n for _, n in sorted(enumerate(names), key=key)]


def _block_dim(shape: Sequence[int], num_blocks: int) -> tuple[int, int]:
    """(dimension, kernel blocks per cache block): vLLM may view a cache block as several
    smaller kernel blocks, `(num_blocks * ratio, ...)`."""
    for d, s in enumerate(shape):
        if s == num_blocks and all(x <= 2 for x in shape[:d]):
            return d, 1
    for d, s in enumerate(shape):
        if s > num_blocks and s % num_blocks == 0 and all(x <= 2 for x in shape[:d]):
            return d, s // num_blocks
    raise LayoutError(f"no block dimension of size {num_blocks} in shape {tuple(shape)}")


def describe(tensors: Sequence[Any], num_blocks: int) -> Described:
    """Piece table of per-layer KV tensors (given in layer order). Raises LayoutError when a
    block's slab of a tensor is not contiguous (cwm moves whole contiguous pieces)."""
    out = Described(num_blocks=num_blocks)
    by_base: dict[int, int] = {}
    for layer, t in enumerate(tensors):
        shape = list(t.shape)
        stride = list(t.stride())
        es = t.element_size()
        out.dtype = out.dtype or str(t.dtype).replace("torch.", "")
        st = t.untyped_storage()
        base = st.data_ptr()
        if base not in by_base:
            by_base[base] = len(out.regions)
            out.regions.append(Region(base=base, nbytes=st.nbytes(), storage=st))
        region = by_base[base]
        bdim, ratio = _block_dim(shape, num_blocks)
        # A block's slab must be one dense byte range; its dims may be permuted (FlashInfer's
        # HND view of an NHD-shaped tensor): pieces move whole, in memory order.
        expect = 1
        for st_, sh in sorted((stride[d], shape[d]) for d in range(bdim + 1, len(shape))
                              if shape[d] != 1):
            if st_ != expect:
                raise LayoutError(
                    f"layer {layer}: dims after the block dim are not contiguous "
                    f"(shape {tuple(shape)}, strides {tuple(stride)})")
            expect *= sh
        slab = math.prod(shape[bdim + 1:])
        if ratio > 1 and stride[bdim] != slab:
            raise LayoutError(f"layer {layer}: the {ratio} kernel blocks of a block are not "
                              f"contiguous (shape {tuple(shape)}, strides {tuple(stride)})")
        piece_len = ratio * slab * es
        outer = shape[:bdim]
        n_outer = math.prod(outer)
        if n_outer == 1:
            kinds = ["kv"]
        elif n_outer == 2:
            kinds = ["k", "v"]
        else:
            raise LayoutError(f"layer {layer}: {n_outer} pieces per block (expected 1 or 2)")
        start = t.data_ptr() - base
        for j, kind in enumerate(kinds):
            # Unravel j over the outer dims.
            off, rem = 0, j
            for d in range(bdim - 1, -1, -1):
                off += (rem % shape[d]) * stride[d]
                rem //= shape[d]
            out.pieces.append({
                "layer": layer, "kind": kind, "tensor": region,
                "offset": start + off * es, "block_stride": ratio * stride[bdim] * es,
                "len": piece_len,
            })
    return out


def layout_request(d: Described, *, layers: int, block_size: int, heads: int, head: int,
                   name: str, inner: str = "opaque") -> dict:
    """The ``layout`` field of a ``register`` request for described tensors."""
    return {
        "kind": "pieces", "name": name, "layers": layers, "blocks": d.num_blocks,
        "block_size": block_size, "heads": heads, "head": head, "dtype": d.dtype,
        "inner": inner, "pieces": d.pieces,
    }


def cuda_ipc_region(region: Region) -> dict:
    """A region as a CUDA IPC tensor for ``register`` (allocation handle + offset + size)."""
    info = region.storage._share_cuda_()
    handle, offset = bytes(info[1]), int(info[3])
    # torch >= 2.5 prefixes cudaIpcMemHandle_t with a version byte and a type byte
    # ('c': cudaMalloc segment; 'e': expandable segment, which cuIpcOpenMemHandle cannot open).
    if len(handle) == 66:
        if handle[1:2] != b"c":
            raise LayoutError("KV cache in an expandable segment: set "
                              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False")
        handle = handle[2:]
    elif len(handle) == 65:
        handle = handle[1:]
    return {"handle": handle.hex(), "offset": offset, "size": region.nbytes}
