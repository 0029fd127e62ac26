"""asyncio-only behaviour (pytest-asyncio, strict mode): task.cancel and asyncio.timeout."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aeplb import Communicator

from .fakes import FakeTransport


@pytest.mark.asyncio
async def test_task_cancel_then_next_batch() -> None:
    fake = FakeTransport()
    comm = Communicator(fake, check_peers=False)
    fake.gate.clear()
    buf = torch.zeros(8)
    comm.add_recv(buf, 1)
    task = asyncio.ensure_future(comm.execute())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    comm.add_send(torch.ones(1), 1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, fake.gate.set)
    await comm.execute()
    assert torch.equal(buf, torch.full((8,), 7.0)), "the cancelled batch still completed"
    await comm.aclose()


@pytest.mark.asyncio
async def test_asyncio_timeout_is_plain_cancellation() -> None:
    fake = FakeTransport()
    comm = Communicator(fake, check_peers=False)
    fake.gate.clear()
    comm.add_recv(torch.zeros(1), 1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await comm.execute()
    assert not comm.statistics().broken, "cancellation is never a communicator failure"
    fake.gate.set()
    await comm.aclose()
