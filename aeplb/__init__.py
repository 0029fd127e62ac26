"""aeplb: asynchronous expert-weight transfers for MoE expert-parallel load balancing."""

from __future__ import annotations

from ._batch import Batch
from ._blocking import BlockingCommunicator
from ._communicator import Communicator
from ._create import create_communicator
from ._exceptions import (
    AEPLBError,
    BackendUnavailableError,
    BrokenCommunicatorError,
    BusyCommunicatorError,
    ClosedCommunicatorError,
    InvalidTransferError,
    PeerMismatchError,
    TransferError,
    TransferTimeoutError,
)
from ._stats import CommunicatorStatistics, TransferStats
from .plan import LayerPlan, RearrangementPlan, plan_rearrangement
from .policy import Placement, rebalance_experts
from .rearrange import RearrangeStats, rearrange_experts

__version__ = "0.1.0.dev0"

__all__ = [
    # communicator
    "create_communicator",
    "Communicator",
    "BlockingCommunicator",
    "Batch",
    "TransferStats",
    "CommunicatorStatistics",
    # placement and planning
    "rebalance_experts",
    "Placement",
    "plan_rearrangement",
    "RearrangementPlan",
    "LayerPlan",
    # rearrangement
    "rearrange_experts",
    "RearrangeStats",
    # exceptions
    "AEPLBError",
    "InvalidTransferError",
    "TransferError",
    "TransferTimeoutError",
    "PeerMismatchError",
    "ClosedCommunicatorError",
    "BrokenCommunicatorError",
    "BusyCommunicatorError",
    "BackendUnavailableError",
]
