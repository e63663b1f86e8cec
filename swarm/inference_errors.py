"""What a failed step or open raises on the client: which peer, why (a protocol error code), and
whether it could not even be reached (it may have moved). Its own module so that what inspects such
errors (failover, spot checks, the API, the CLI) imports it without importing the session."""

from __future__ import annotations

import trio


class InferenceError(Exception):
    """A step or an open failed on one peer of the route."""

    def __init__(self, message: str, peer_id: str | None = None, code: str | None = None,
                 unreachable: bool = False):
        super().__init__(message)
        self.peer_id = peer_id
        self.code = code
        self.unreachable = unreachable  # could not even connect: maybe it moved to a new address


def as_inference_error(exc: BaseException) -> InferenceError:
    """trio nurseries wrap what crosses them in ExceptionGroups: hand callers the InferenceError."""
    if isinstance(exc, InferenceError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        match = exc.subgroup(InferenceError)
        if match is not None:
            while isinstance(match, BaseExceptionGroup):
                match = match.exceptions[0]
            return match
    if isinstance(exc, trio.TooSlowError):
        return InferenceError("peers did not answer `open` in time")
    return InferenceError(f"session could not open: {exc!r}")
