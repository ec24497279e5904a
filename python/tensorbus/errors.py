"""Exceptions raised by tensorbus besides the built-in TimeoutError, ConnectionError and ValueError."""


class TransferError(RuntimeError):
    """A transfer failed somewhere in the job.

    Attributes:
        message: what happened, as reported by the failing party.
        node_id: the node where it happened (e.g. ``"agent:3"``).
    """

    def __init__(self, message: str, node_id: str = ""):
        super().__init__(message, node_id)
        self.message = message
        self.node_id = node_id

    def __str__(self) -> str:
        return self.message
