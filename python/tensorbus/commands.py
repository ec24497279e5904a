"""Host commands as msgspec structs, laid out exactly as the reference's ``etha.tensor_bus.commands``
(tagged with the class name, ``kw_only``): what a worker puts in its agent's command queue.
They encode byte-identically to the commands tensorbus's own client sends (tested against the
agent's decoder). Needs ``msgspec`` (``pip install msgspec``); the rest of tensorbus does not.

Tensor payloads and mesh/placement payloads are tensorbus's own versioned encodings (see
docs/protocol.md).
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

__all__ = ["BaseCommand", "InitPair", "RegisterTensors", "Transfer", "QueryStatus", "CleanupBatch", "Message",
           "encode", "decode"]


class BaseCommand(msgspec.Struct, tag=True, kw_only=True):
    """Base class for all commands: the class name is the ``"type"`` tag; ``semaphore_name`` names
    the POSIX semaphore the agent posts when the command's result is in the state store."""

    timestamp: float | None = None
    semaphore_name: str | None = None


class InitPair(BaseCommand):
    """Registers this rank for a pair: its side's mesh and placements."""

    pair_name: str
    local_name: str
    remote_name: str
    expected_world_size: int
    mesh_shape_payload: memoryview | None = None
    placements_payload: memoryview | None = None


class RegisterTensors(BaseCommand):
    """Registers local shards across pairs under one batch id: ``[(pair_name, tensor_payload)]``."""

    batch_id: str
    tensors: list[tuple[str, memoryview]]
    bucket_size: int | None = None


class Transfer(BaseCommand):
    """Arms the batch's next transfer, sending or receiving."""

    batch_id: str
    transfer_type: Literal["send", "recv"]


class QueryStatus(BaseCommand):
    """Refreshes a state of the batch (``"transfer_signal"``, ``"epoch_ended:N"``)."""

    batch_id: str
    state_name: str


class CleanupBatch(BaseCommand):
    """Releases everything the batch holds in the agent."""

    batch_id: str


Message = Union[InitPair, RegisterTensors, Transfer, QueryStatus, CleanupBatch]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(command: BaseCommand) -> bytes:
    """The msgpack bytes of a command, as the agent reads them from its queue."""
    return _encoder.encode(command)


def decode(data: bytes) -> BaseCommand:
    """A command from its msgpack bytes (raises ``msgspec.ValidationError`` / ``DecodeError``)."""
    return _decoder.decode(data)
