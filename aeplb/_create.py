from __future__ import annotations

import weakref
from typing import Any, cast

import torch
import torch.distributed as dist

from ._checks import check_bool, check_timeout, set_up_timeout
from ._communicator import Communicator
from ._exceptions import AEPLBError, BackendUnavailableError, InvalidTransferError, short_error
from .transports._base import Transport

BACKENDS = ("auto", "nccl", "pynccl", "gloo", "ipc")
# Gloo over one TCP connection tops out near 1.8 GB/s; staging CUDA tensors wants more.
DEFAULT_STRIPES = 8
# What new_group() returns on a process that is not one of the group's ranks.
NON_MEMBER = dist.GroupMember.NON_GROUP_MEMBER


# Backend options each transport takes (the communicator's own are popped before).
_CUDA_OPTIONS = frozenset({"max_ops_per_group", "coalesce", "chunk_bytes", "staging_bytes"})
_OPTIONS = {
    "gloo": frozenset({"chunk_bytes", "staging_bytes", "stripes"}),
    "pynccl": _CUDA_OPTIONS | {"nccl_library"},
}


# Open communicators whose batches travel on the caller's group, with that group.
_posting: weakref.WeakKeyDictionary[Communicator, dist.ProcessGroup] = weakref.WeakKeyDictionary()


def _claim(group: dist.ProcessGroup, transport: Transport) -> None:
    """Refuses a second communicator that would post on ``group``: NCCL matches
    point-to-point messages by peer and order alone, so two communicators' batches on one
    group would receive each other's data. Every rank refuses alike (creation is
    collective, so every rank has the same communicators open)."""
    for comm, used in list(_posting.items()):
        state = comm.statistics()
        if used is group and not (state.closed or state.broken):
            transport.close()
            raise InvalidTransferError(
                f"create_communicator: {comm!r} already sends its batches over this "
                f"process group, and a second {transport.name} communicator on it would mix "
                "data with it; close that one first, or give each its own group "
                "(torch.distributed.new_group(backend='nccl'), called on every rank)"
            )


def _set_up_failed(rank: int, exc: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"create_communicator: the first exchange with every peer failed on rank {rank} "
        f"({short_error(exc)}); every rank of the group must create the communicator, with "
        "the same options"
    )


def default_stripes(world_size: int) -> int:
    """Gloo stripes where none are asked for: only CUDA tensors need them (staging), and
    pieces to many peers are on the wire at once already, so fewer stripes each."""
    if not torch.cuda.is_available():
        return 1
    return max(DEFAULT_STRIPES // max(world_size - 1, 1), 1)


def _group_backends(group: dist.ProcessGroup) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # pragma: no cover - exotic groups
        return ""


def _choose(backend: str, group: dist.ProcessGroup, device: torch.device | None) -> str:
    if backend != "auto":
        return backend
    wants_cuda = device is not None and device.type == "cuda"
    if device is None:
        wants_cuda = torch.cuda.is_available() and "nccl" in _group_backends(group)
    return "ipc-or-nccl" if wants_cuda else "gloo"


def _make_transport(
    name: str,
    group: dist.ProcessGroup,
    rank: int,
    world_size: int,
    device: torch.device | None,
    options: dict[str, Any],
    timeout: float | None,
) -> Transport:
    """Builds the transport; ``options`` hold only names ``_OPTIONS`` allows for ``name``."""
    backends = _group_backends(group)
    if name == "gloo":
        if "gloo" not in backends:
            raise BackendUnavailableError(
                f"backend='gloo' needs a process group with Gloo, but this group runs "
                f"{backends!r}; pass group=torch.distributed.new_group(backend='gloo') "
                "(called on every rank)"
            )
        from .transports.gloo import GlooTransport

        stripes = options.pop("stripes", default_stripes(world_size))
        # what is left are the names _OPTIONS["gloo"] allowed: chunk_bytes, staging_bytes
        gloo = GlooTransport(rank, world_size, stripes=stripes, device=device, **options)
        try:
            gloo.connect(group, set_up_timeout(timeout))
        except Exception as exc:
            raise _set_up_failed(rank, exc) from exc
        return gloo
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"backend={name!r} needs CUDA, but torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}); use backend='gloo' for CPU tensors, or install a "
            "CUDA build of torch on a machine with GPUs"
        )
    from ._cuda import resolve_device

    cuda_device = resolve_device(device)
    library = options.pop("nccl_library", None)  # pynccl's only (see _OPTIONS)
    nccl_options = options  # the rest: _CUDA_OPTIONS, checked by create_communicator
    if name in ("ipc", "ipc-or-nccl"):
        from .transports import ipc

        try:
            node = ipc.connect(group, rank, world_size, cuda_device)
        except BackendUnavailableError:
            if name == "ipc":
                raise
            name = "nccl"  # every rank saw the same problem, so every rank falls back
        else:
            remote = None
            if node is None or len(node.peers) < world_size - 1:
                if "nccl" not in backends:
                    raise BackendUnavailableError(
                        "backend='ipc' reaches ranks on other nodes through NCCL, but this "
                        f"group runs {backends!r}; pass a group with NCCL"
                    )
                from .transports.nccl import NCCLTransport

                remote = NCCLTransport(group, rank, world_size, cuda_device, **nccl_options)
            return ipc.IPCTransport(rank, world_size, cuda_device, node, remote)
    if name == "nccl":
        if "nccl" not in backends:
            raise BackendUnavailableError(
                f"backend='nccl' needs a process group with NCCL, but this group runs "
                f"{backends!r}; pass group=torch.distributed.new_group(backend='nccl') "
                "(called on every rank), or use backend='pynccl' which brings its own NCCL"
            )
        from .transports.nccl import NCCLTransport

        return NCCLTransport(group, rank, world_size, cuda_device, **nccl_options)
    from .transports.pynccl import PyNCCLTransport

    return PyNCCLTransport(group, rank, world_size, cuda_device, library=library, **nccl_options)


def create_communicator(
    backend: str = "auto",
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | int | None = None,
    timeout: float | None = None,
    **options: Any,
) -> Communicator:
    """Creates an awaitable communicator over a torch.distributed process group.

    Call it on every rank of ``group``. Ranks passed to ``add_send``/``add_recv`` are
    ranks within ``group``.

    Args:
        backend: ``"auto"`` (for CUDA devices on an NCCL-capable group: ``"ipc"`` where
            every rank can use CUDA IPC, else ``"nccl"``; otherwise Gloo), ``"nccl"``,
            ``"pynccl"``, ``"gloo"`` or ``"ipc"`` (copy engines through CUDA IPC between
            ranks of one node, no kernels; ranks on other nodes go through NCCL in the
            same batch).
        group: The process group to use; default ``torch.distributed.group.WORLD``. A group
            dedicated to expert transfers keeps them apart from the model's collectives.
        device: The CUDA device the tensors live on, for CUDA backends.
        timeout: Default deadline in seconds for every ``execute()``; None waits without an
            aeplb deadline (the process group's own timeout still applies).
        **options: Backend options; each must be the same on every rank.
            ``check_peers`` (bool, default True): before each batch, exchange a small
            manifest (op count, bytes and a digest of dtypes and sizes per peer) so that
            op lists which do not pair up raise PeerMismatchError on every rank instead of
            hanging. With it on, every rank of the group must call ``execute()`` for every
            batch, even with nothing queued. Where every rank of the group runs on one
            node, the manifests go through shared memory, set up at creation (so creation
            waits for every rank even with ``warm_up=False``; within the warm-up's
            deadline); on ipc they ride with the buffer descriptors, so the check adds no
            round trip.
            ``warm_up`` (bool, default True): run one tiny batch with every peer before
            returning, so that what a backend sets up on first use (NCCL's communicator and
            its connection to each peer: 0.2 to 0.7 s on two GPUs) happens now and not in
            the first transfer, where it could miss a short deadline. Creation then waits
            for every rank of the group, up to the communicator's timeout (at least
            120 s; no aeplb deadline when timeout is None), and raises
            BackendUnavailableError if a peer fails. The warm-up is not counted in
            ``statistics()``.
            ``coalesce`` (nccl, pynccl, and ipc's NCCL for other nodes; default True):
            send all tensors for one peer as one byte stream, cut into as few equal pieces
            of at most ``chunk_bytes`` as it takes (default 512 MiB, or less so that a
            stream to and from every peer fits: ``staging_bytes`` / (2 x (ranks - 1))),
            packing pieces that span several tensors into a device staging pool of at most
            ``staging_bytes`` (default 1 GiB), pipelined with the transfer where the pool
            holds more than one piece per stream.
            ``max_ops_per_group`` (nccl, pynccl with coalesce=False; default 64, None for
            no cap): ops in one NCCL group; larger batches are split so that no rank can
            deadlock.
            ``nccl_library`` (pynccl): path of libnccl.so; default: the one torch loaded,
            the nvidia-nccl wheel's, or ``$AEPLB_NCCL_LIBRARY``.
            ``enqueue_on`` (nccl, pynccl; ``"worker"`` by default; ipc has no NCCL work to
            move): ``"caller"`` enqueues the NCCL work on the thread that calls
            ``execute()`` and leaves only the wait to the worker, so no NCCL call comes from
            another thread; needs ``check_peers=False``.
            ``chunk_bytes`` / ``staging_bytes`` (gloo): piece size on the wire (default
            8 MiB, less where the lanes need it to each get a slot) and the bound on pinned
            host memory for CUDA tensors (default 256 MiB).
            ``stripes`` (gloo; default where CUDA is available 8 // (ranks - 1), at least
            1, else 1): Gloo groups, each with its own connections, that pieces are spread
            over; the communicator makes the extra ones and closes them with itself.

    Returns:
        A new :class:`Communicator`.

    Raises:
        BackendUnavailableError: torch.distributed is not initialized, the backend
            cannot run here, or the warm-up failed; the message says what is missing.
        InvalidTransferError: an argument is wrong.

    With ``"ipc"``, every rank of the group calls ``execute()`` for every batch, even
    with nothing queued (the ranks of a node exchange where to write each batch), and
    receive tensors must come from memory that CUDA IPC can share (the default caching
    allocator, not ``expandable_segments``). A sender keeps the receiver's allocations
    mapped between batches, so freed receive buffers return to the driver only when a
    newer allocation takes their place, after 4096 others, or at ``aclose()``.
    """
    if backend not in BACKENDS:
        raise InvalidTransferError(
            f"create_communicator: backend must be one of {', '.join(BACKENDS)}; got {backend!r}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise BackendUnavailableError(
            "torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if group is None:
        group = dist.group.WORLD
        assert group is not None
    elif not isinstance(given := cast(object, group), dist.ProcessGroup) and given != NON_MEMBER:
        raise InvalidTransferError(
            f"create_communicator: group must be a torch.distributed.ProcessGroup (from "
            f"new_group) or None for the default group, got {type(group).__name__}"
        )
    check_timeout(timeout, "create_communicator")  # before any group is created
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidTransferError(
            "create_communicator: this process is not a member of `group`; create the "
            "communicator only on the group's ranks"
        )
    world_size = dist.get_world_size(group)
    dev = None
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidTransferError(
                f"create_communicator: device={device!r} is not a torch device"
            ) from exc
    check_peers = check_bool(options.pop("check_peers", True), "check_peers")
    enqueue_on = options.pop("enqueue_on", "worker")
    warm_up = check_bool(options.pop("warm_up", True), "warm_up")
    name = _choose(backend, group, dev)
    unknown = set(options) - _OPTIONS.get(name, _CUDA_OPTIONS)
    if unknown:  # before the transport exists: it may hold groups, threads, an NCCL comm
        raise TypeError(
            f"create_communicator() got unknown option(s) {sorted(unknown)}; "
            "see help(aeplb.create_communicator)"
        )
    transport = _make_transport(name, group, rank, world_size, dev, options, timeout)
    if transport.posts_on_group:
        _claim(group, transport)
    comm = Communicator(transport, timeout=timeout, check_peers=check_peers, enqueue_on=enqueue_on)
    if transport.posts_on_group:
        _posting[comm] = group
    try:
        comm._share_node()
        if warm_up:
            comm._warm_up()
    except AEPLBError as exc:
        comm._close_blocking()
        raise _set_up_failed(rank, exc) from exc
    return comm
