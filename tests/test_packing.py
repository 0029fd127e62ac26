"""Byte streams read off the op table, and packing their pieces (the NCCL engine that uses
them runs in the GPU tests; Gloo uses them in the CPU rank tests)."""

from __future__ import annotations

import pytest
import torch

from aeplb._ops import OpKind, OpQueue, PreparedBatch, prepare
from aeplb.transports import _streams
from aeplb.transports._streams import ByteStream, byte_streams

from .payloads import payload


def batch_of(ops: list[tuple[OpKind, torch.Tensor, int]]) -> PreparedBatch:
    queue = OpQueue()
    for kind, tensor, peer in ops:
        queue.add(kind, tensor, peer, rank=0)
    return prepare(queue, 0)


def stream_of(tensors: list[torch.Tensor]) -> ByteStream:
    (stream,) = byte_streams(batch_of([(OpKind.SEND, t, 1) for t in tensors]))
    return stream


def flat_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_streams.as_bytes(t) for t in tensors if t.numel()])


MIXED = [
    ((3,), torch.int64),
    ((2, 5), torch.float32),
    ((7,), torch.uint8),
    ((0,), torch.float32),
    ((4,), torch.bfloat16),
    ((3, 1), torch.int16),
]


@pytest.mark.parametrize("same_device", [True, False])
def test_pieces_cover_exact_byte_ranges(same_device: bool) -> None:
    tensors = [payload(i + 1, s, d) for i, (s, d) in enumerate(MIXED)]
    stream = stream_of(tensors)
    flat = flat_bytes(tensors)
    assert stream.nbytes == flat.numel() and len(stream) == 5  # the empty one is dropped
    for start in range(stream.nbytes):
        for stop in range(start + 1, stream.nbytes + 1):
            piece = stream.piece(start, stop)
            assert piece.nbytes == stop - start
            buf = torch.zeros(piece.nbytes, dtype=torch.uint8)
            piece.gather(buf, same_device=same_device)
            assert torch.equal(buf, flat[start:stop]), (start, stop)


@pytest.mark.parametrize("same_device", [True, False])
def test_scatter_writes_exactly_its_bytes(same_device: bool) -> None:
    shapes = [(s, d) for s, d in MIXED]
    total = flat_bytes([torch.empty(s, dtype=d) for s, d in shapes]).numel()
    incoming = payload(99, (total,), torch.uint8)
    for start, stop in [(0, total), (1, total - 1), (5, 30), (24, 25), (40, total)]:
        dests = [torch.zeros(s, dtype=d) for s, d in shapes]
        piece = stream_of(dests).piece(start, stop)
        piece.scatter(incoming[start:stop].clone(), same_device=same_device)
        got = flat_bytes(dests)
        assert torch.equal(got[start:stop], incoming[start:stop])
        assert not got[:start].any() and not got[stop:].any(), "bytes outside the piece"


def test_back_to_back_views_of_one_storage_go_as_one_view() -> None:
    base = payload(3, (100,), torch.float32)
    a, b, c = base[0:10], base[10:30].view(4, 5), base[50:60]
    stream = stream_of([a, b])
    piece = stream.piece(4, 120)
    assert piece.view is not None, "adjacent views of one tensor need no packing"
    assert piece.view.data_ptr() == base.data_ptr() + 4
    assert torch.equal(piece.view, _streams.as_bytes(base)[4:120])
    gapped = stream_of([a, b, c])
    assert gapped.piece(0, 160).view is None
    assert gapped.piece(40, 120).view is not None  # b alone
    buf = torch.empty(160, dtype=torch.uint8)
    gapped.piece(0, 160).gather(buf, same_device=True)
    assert torch.equal(buf, flat_bytes([a, b, c]))


def test_neighbouring_storages_are_never_joined() -> None:
    memory = bytearray(payload(4, (64,), torch.uint8).numpy().tobytes())
    left = torch.frombuffer(memory, dtype=torch.uint8, count=32)
    right = torch.frombuffer(memory, dtype=torch.uint8, count=32, offset=32)
    assert right.data_ptr() == left.data_ptr() + 32
    assert left.untyped_storage().data_ptr() != right.untyped_storage().data_ptr()
    piece = stream_of([left, right]).piece(0, 64)
    assert piece.view is None, "a view may not span two storages"
    buf = torch.empty(64, dtype=torch.uint8)
    piece.gather(buf, same_device=True)
    assert bytes(buf.numpy()) == bytes(memory)


@pytest.mark.parametrize("same_device", [True, False])
def test_many_tensors_of_one_dtype_pack_without_a_view_each(
    monkeypatch: pytest.MonkeyPatch, same_device: bool
) -> None:
    n = 3 * _streams.FEW
    shapes = [(1 + i % 7, 2 + i % 3) for i in range(n)]
    sources = [payload(10 + i, s, torch.float32) for i, s in enumerate(shapes)]
    flat = flat_bytes(sources)
    calls: list[torch.Tensor] = []
    real = _streams.as_bytes

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return real(t)

    monkeypatch.setattr(_streams, "as_bytes", counted)
    stream = stream_of(sources)
    size = 1000  # not a multiple of 4: some pieces start inside a tensor, off alignment
    for start in range(0, stream.nbytes, size):
        stop = min(start + size, stream.nbytes)
        piece = stream.piece(start, stop)
        if len(piece.whole) > _streams.FEW:
            assert piece.dtype == torch.float32
        buf = torch.empty(piece.nbytes, dtype=torch.uint8)
        piece.gather(buf, same_device=same_device)
        assert torch.equal(buf, flat[start:stop])
    # one long piece: a view for its head and tail at most, none per tensor
    calls.clear()
    piece = stream.piece(4, stream.nbytes - 4)  # inside the first and last tensors
    buf = torch.empty(piece.nbytes, dtype=torch.uint8)
    piece.gather(buf, same_device=same_device)
    assert len(piece.whole) == n - 2 and piece.dtype == torch.float32
    assert len(calls) <= 2
    dests = [torch.zeros(s, dtype=torch.float32) for s in shapes]
    calls.clear()
    stream_of(dests).piece(4, stream.nbytes - 4).scatter(buf, same_device=same_device)
    assert len(calls) <= 2
    got = flat_bytes(dests)
    assert torch.equal(got[4:-4], flat[4:-4]) and not got[:4].any() and not got[-4:].any()


def test_many_tensors_of_mixed_dtypes_pack_through_views() -> None:
    dtypes = [torch.float32, torch.int8, torch.bfloat16]
    sources = [payload(i + 1, (3 + i % 5,), dtypes[i % 3]) for i in range(2 * _streams.FEW)]
    piece = stream_of(sources).piece(0, flat_bytes(sources).numel())
    assert piece.dtype is None
    buf = torch.empty(piece.nbytes, dtype=torch.uint8)
    piece.gather(buf, same_device=True)
    assert torch.equal(buf, flat_bytes(sources))
    dests = [torch.zeros_like(t) for t in sources]
    stream_of(dests).piece(0, piece.nbytes).scatter(buf, same_device=True)
    assert all(torch.equal(d, s) for d, s in zip(dests, sources, strict=True))


def test_streams_split_by_direction_and_peer_in_first_use_order() -> None:
    t = [payload(i + 1, (i + 2,), torch.float32) for i in range(6)]
    ops = [
        (OpKind.RECV, t[0], 2),
        (OpKind.SEND, t[1], 1),
        (OpKind.SEND, torch.empty(0), 3),  # empty: no stream
        (OpKind.RECV, t[2], 2),
        (OpKind.SEND, t[3], 2),
        (OpKind.SEND, t[4], 1),
        (OpKind.RECV, t[5], 0),  # a self-receive: a local copy, not a stream
        (OpKind.SEND, t[5].clone(), 0),
    ]
    streams = byte_streams(batch_of(ops))
    assert [(s.kind, s.peer) for s in streams] == [
        (OpKind.RECV, 2),
        (OpKind.SEND, 1),
        (OpKind.SEND, 2),
    ]
    expected = [[t[0], t[2]], [t[1], t[4]], [t[3]]]
    for stream, tensors in zip(streams, expected, strict=True):
        assert len(stream) == len(tensors)
        buf = torch.empty(stream.nbytes, dtype=torch.uint8)
        stream.piece(0, stream.nbytes).gather(buf, same_device=True)
        assert torch.equal(buf, flat_bytes(tensors))
    assert byte_streams(batch_of([(OpKind.SEND, torch.empty(0), 1)])) == []


def test_many_large_tensors_of_one_dtype_gather_through_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_streams, "SMALL", 16)  # every tensor here counts as large
    sources = [payload(i + 1, (3, 2 + i % 4), torch.float32) for i in range(2 * _streams.FEW)]
    stream = stream_of(sources)
    for start, stop in [(0, stream.nbytes), (6, stream.nbytes - 2)]:
        piece = stream.piece(start, stop)
        assert piece.dtype == torch.float32
        buf = torch.empty(piece.nbytes, dtype=torch.uint8)
        piece.gather(buf, same_device=True)
        assert torch.equal(buf, flat_bytes(sources)[start:stop])


@pytest.mark.parametrize("world", [2, 3, 4, 8, 16, 64])
def test_default_nccl_chunk_gives_every_stream_a_slot(world: int) -> None:
    from aeplb.transports._packing import DEFAULT_STAGING_BYTES, default_chunk_bytes

    chunk = default_chunk_bytes(DEFAULT_STAGING_BYTES, world)
    lanes = 2 * (world - 1)  # a stream to and from every peer, each needing staging
    assert DEFAULT_STAGING_BYTES // chunk >= lanes
    assert chunk % (1 << 20) == 0
    assert default_chunk_bytes(DEFAULT_STAGING_BYTES, 2) == 512 << 20  # measured on 2 GPUs
    assert default_chunk_bytes(1000, world) == 1000  # a tiny pool: one chunk of it all


@pytest.mark.parametrize("chunk", [1, 7, 9999, 4096, 1 << 20, 512 << 20])
@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 10**6, 672 << 20, (2 << 30) + 3])
def test_streams_are_cut_in_as_few_equal_pieces_as_the_chunk_allows(
    nbytes: int, chunk: int
) -> None:
    from aeplb.transports._packing import piece_bytes

    size = piece_bytes(nbytes, chunk)
    assert 0 < size <= chunk
    assert -(-nbytes // size) == -(-nbytes // chunk)  # no more pieces than chunks
    if size > 4096 and chunk % 4096 == 0:
        assert size % 4096 == 0
    assert piece_bytes(672 << 20, 512 << 20) == 336 << 20


@pytest.mark.parametrize("world", [2, 3, 4, 8, 16, 64, 256])
def test_default_gloo_stripes_and_chunk_give_every_lane_a_slot(
    world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aeplb._create import default_stripes
    from aeplb.transports.gloo import DEFAULT_STAGING_BYTES, default_chunk_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_stripes(world) == 1  # CPU tensors need no staging, nor stripes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    stripes = default_stripes(world)
    assert stripes == {2: 8, 3: 4, 4: 2}.get(world, 1)
    lanes = 2 * (world - 1) * stripes
    chunk = default_chunk_bytes(DEFAULT_STAGING_BYTES, lanes)
    assert DEFAULT_STAGING_BYTES // (lanes * chunk) >= 1
    assert chunk <= 8 << 20 and chunk % (64 << 10) == 0
