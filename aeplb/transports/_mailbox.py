"""Shared-memory message channels between the ranks of one node.

One file in shared memory holds a single-producer, single-consumer channel for every
ordered pair of local ranks and every message kind. A channel is two counters and a
payload area: the writer puts a frame in the area and bumps ``written``; the reader checks
the frame and bumps ``read``; the writer waits for ``read`` to catch up before the next
frame. Messages larger than the area travel as several frames.

Nothing here relies on the order in which another core sees plain stores: every frame
carries its sequence number and a CRC over both, so a reader that catches a frame half
written sees a bad CRC and looks again, and it acknowledges only after the check (a
control dependency, which every CPU keeps in order).

Waiting is polling, on the worker thread: a short spin that yields the GIL, then a backoff
up to ``_POLL_MAX_S``; each wait has a deadline and notices a peer process that exited.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

# Counters sit on their own cache lines so the two sides do not contend.
_HEADER: Final = 128
_WRITTEN, _READ = 0, 8  # int64 word offsets within a channel header
_FRAME = struct.Struct("<qqqq")  # seq, total message bytes, bytes in this frame, crc
_SPIN_S: Final = 200e-6
_POLL_MAX_S: Final = 500e-6
_LIVENESS_EVERY_S: Final = 0.05


def _crc(seq: int, total: int, data: bytes | memoryview) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack("<qq", seq, total)))


class PeerExitedError(ConnectionError):
    """Raised when the process of a local peer is gone while this rank waits for it."""


class Mailbox:
    """Channels between ``ranks`` local processes, mapped from one shared file.

    Args:
        path: The shared file (created and sized by one rank with :meth:`create`).
        index: This process's index among the local ranks.
        capacities: Payload bytes of one channel, per message kind.
        ranks: How many local ranks share the file.
        alive: Called with a peer's index while waiting on it; returns False once the
            peer's process is gone.
    """

    def __init__(
        self,
        path: str,
        index: int,
        capacities: Sequence[int],
        ranks: int,
        alive: Callable[[int], bool] | None = None,
    ) -> None:
        self.index = index
        self.ranks = ranks
        self._caps = list(capacities)
        self._alive = alive
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, self.file_size(capacities, ranks))
        finally:
            os.close(fd)
        self._words = np.frombuffer(self._mm, dtype=np.int64)
        self._kind_base = [0]
        for cap in self._caps[:-1]:
            self._kind_base.append(self._kind_base[-1] + ranks * ranks * (_HEADER + cap))
        kinds = len(self._caps)
        self._sent = np.zeros((kinds, ranks), dtype=np.int64)
        self._got = np.zeros((kinds, ranks), dtype=np.int64)

    @staticmethod
    def file_size(capacities: Sequence[int], ranks: int) -> int:
        return sum(ranks * ranks * (_HEADER + cap) for cap in capacities)

    @classmethod
    def create(cls, path: str, capacities: Sequence[int], ranks: int) -> None:
        """Creates the zeroed shared file (pages are only backed once touched)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, cls.file_size(capacities, ranks))
        finally:
            os.close(fd)

    def _channel(self, kind: int, src: int, dst: int) -> int:
        return self._kind_base[kind] + (src * self.ranks + dst) * (_HEADER + self._caps[kind])

    def send(self, kind: int, dst: int, data: bytes, deadline: float | None) -> None:
        """Sends ``data`` to local rank ``dst``; waits only while its previous frame is unread."""
        self.exchange(kind, {dst: data}, [], deadline)

    def recv(self, kind: int, src: int, deadline: float | None) -> bytes:
        """The next message from local rank ``src`` on channel ``kind``."""
        return self.exchange(kind, {}, [src], deadline)[src]

    def exchange(
        self,
        kind: int,
        outgoing: dict[int, bytes],
        incoming: Sequence[int],
        deadline: float | None,
    ) -> dict[int, bytes]:
        """Sends and receives one message per listed peer, all at once.

        Frames move in whatever order the peers allow, so two ranks sending each other
        messages larger than a channel cannot deadlock.
        """
        sending = {dst: 0 for dst in outgoing}
        receiving: dict[int, list[bytes]] = {src: [] for src in incoming}
        totals: dict[int, int] = {}
        got: dict[int, bytes] = {}
        began = time.monotonic()
        checked = began
        delay = 0.0
        while sending or receiving:
            progress = False
            for dst in list(sending):
                pos = self._try_write(kind, dst, outgoing[dst], sending[dst])
                if pos is not None:
                    progress = True
                    if pos >= len(outgoing[dst]):
                        del sending[dst]
                    else:
                        sending[dst] = pos
            for src in list(receiving):
                frame = self._try_read(kind, src)
                if frame is not None:
                    progress = True
                    total, body = frame
                    totals[src] = total
                    receiving[src].append(body)
                    if sum(len(c) for c in receiving[src]) >= total:
                        got[src] = b"".join(receiving.pop(src))
            if progress:
                delay = 0.0
                continue
            now = time.monotonic()
            waiting = sorted(set(sending) | set(receiving))
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"local rank(s) {waiting} did not exchange messages before the deadline"
                )
            if self._alive is not None and now - checked >= _LIVENESS_EVERY_S:
                checked = now
                for peer in waiting:
                    if not self._alive(peer):
                        raise PeerExitedError(f"the process of local rank {peer} has exited")
            if now - began > _SPIN_S:
                # a late peer delays this rank by at most ~1/16 of the wait so far
                delay = min(max(delay * 2, 10e-6), (now - began) / 16, _POLL_MAX_S)
            time.sleep(delay)  # sleep(0) still lets the event loop's thread take the GIL
        return got

    def _try_write(self, kind: int, dst: int, data: bytes, pos: int) -> int | None:
        """Writes the next frame if the channel is free; returns the new position."""
        base = self._channel(kind, self.index, dst)
        seq = int(self._sent[kind, dst]) + 1
        if self._words[(base >> 3) + _READ] < seq - 1:
            return None
        part = data[pos : pos + self._caps[kind] - _FRAME.size]
        start = base + _HEADER
        self._mm[start + _FRAME.size : start + _FRAME.size + len(part)] = part
        crc = _crc(seq, len(data), part)
        self._mm[start : start + _FRAME.size] = _FRAME.pack(seq, len(data), len(part), crc)
        self._words[(base >> 3) + _WRITTEN] = seq
        self._sent[kind, dst] = seq
        return pos + len(part) if data else 1

    def _try_read(self, kind: int, src: int) -> tuple[int, bytes] | None:
        """Reads the next frame if a whole, checked one is there."""
        base = self._channel(kind, src, self.index)
        seq = int(self._got[kind, src]) + 1
        if self._words[(base >> 3) + _WRITTEN] < seq:
            return None
        start = base + _HEADER
        fseq, total, length, crc = _FRAME.unpack_from(self._mm, start)
        if fseq != seq or not 0 <= length <= self._caps[kind] - _FRAME.size:
            return None
        body = self._mm[start + _FRAME.size : start + _FRAME.size + length]
        if _crc(seq, total, body) != crc:
            return None  # caught mid-write: look again
        self._words[(base >> 3) + _READ] = seq
        self._got[kind, src] = seq
        return total, body

    def close(self) -> None:
        del self._words
        self._mm.close()
