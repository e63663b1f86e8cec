"""The caps a peer puts on sessions (see session_limits.py), as plain configuration.

Apart from session_limits.py so that building `molink-peer`'s argument parser (which shows these
defaults) imports neither torch nor the protocol: `molink-peer bootstrap` starts in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionLimits:
    # The registry's old fixed cap; one handler task + a stream per session, ~100 KB each.
    max_sessions: int = 256
    # The HTTP endpoint (one client id) runs 8 generations at once by default, each one session
    # per hop, plus spot-check verifiers; benchmarks drive 64. Four ids are needed to fill a peer.
    max_sessions_per_client: int = 64
    # None: a session may reserve the whole cache budget (it is refused when that is taken).
    max_session_tokens: int | None = None
    # 4 h: 10 tokens/s for 4 h is 144k tokens, past any context length we serve.
    max_session_seconds: float = 4 * 3600.0
    # Opens take milliseconds unless the next hop is slow to dial (up to 2 x 5 s); a burst of
    # a client's concurrent generations fits in 32; 128 in all keeps outgoing dials bounded.
    max_pending_opens_per_client: int = 32
    max_pending_opens: int = 128

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_sessions_per_client", "max_pending_opens_per_client",
                     "max_pending_opens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_session_tokens is not None and self.max_session_tokens < 1:
            raise ValueError("max_session_tokens must be at least 1 (or None: no cap)")
        if not self.max_session_seconds > 0:
            raise ValueError("max_session_seconds must be positive")
