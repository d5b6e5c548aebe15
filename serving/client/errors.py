"""serving.client's one failure type: a one-line message and the CLI's exit status."""

from __future__ import annotations


class ClientError(RuntimeError):
    """A one-line failure; `code` is the CLI's exit status (1 server/connection, 2 bad input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
