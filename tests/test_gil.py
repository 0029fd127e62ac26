"""The worker's long Python loops let the event loop's thread in (aeplb._gil.Slicer)."""

from __future__ import annotations

import sys
import threading
import time

import anyio
import pytest

from aeplb import _gil

pytestmark = pytest.mark.anyio


def _spin(seconds: float, step: _gil.Slicer | None) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(50))  # pure Python: keeps the GIL
        if step is not None:
            step()


def test_pauses_about_once_per_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(_gil.time, "sleep", pauses.append)
    _spin(_gil._SLICE_S / 5, _gil.Slicer())
    assert pauses == [], "a loop shorter than a slice never pauses"
    _spin(_gil._SLICE_S * 10.5, _gil.Slicer())
    assert 8 <= len(pauses) <= 11, len(pauses)
    assert all(p == _gil._PAUSE_S for p in pauses)


@pytest.mark.parametrize("sliced", [False, True])
async def test_event_loop_runs_beside_a_long_loop(sliced: bool) -> None:
    # A 50 ms switch interval makes an unsliced 60 ms loop hold the GIL for tens of ms;
    # sliced, the ticker waits about a slice (generous margin for a busy 2-core machine).
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    try:
        worker = threading.Thread(target=_spin, args=(0.06, _gil.Slicer() if sliced else None))
        late: list[float] = []
        last = time.perf_counter()
        worker.start()
        while worker.is_alive():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            late.append(now - last - 0.001)
            last = now
        worker.join()
    finally:
        sys.setswitchinterval(old)
    if sliced:
        assert max(late) < 0.02, f"longest stall {max(late) * 1e3:.1f} ms"
    else:
        assert max(late) > 0.02, "the unsliced loop should have stalled the event loop"
