"""The peer's KV-cache budget: sessions reserve room for their whole length up front.

A session asks for batch_size x max_length tokens when it opens. If the budget has no room the
peer says "busy" at once (the client tries a replica) instead of running out of memory in the
middle of someone's generation. The reservation is released when the session closes, fails or
idles out.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from molink.peer.span import SpanSession


class CacheBudgetExceeded(Exception):
    """No room for the session; `limit` names the cap (cache, sessions, sessions_per_client, session_tokens)."""

    def __init__(self, message: str, limit: str = "cache"):
        super().__init__(message)
        self.limit = limit


@dataclass
class ActiveSession:
    session_id: bytes
    span_session: SpanSession
    batch_size: int
    max_length: int
    reserved_tokens: int
    client_stream: Any = None  # FramedStream back to the client: where the last hop answers
    next_hop: Any = None  # NextHop, or None when this peer is the last hop
    push_stream: Any = None  # FramedStream to the next hop, opened by the handler
    last_used: float = field(default_factory=time.monotonic)
    steps_done: int = 0
    span: Any = None  # the SpanModel it runs on: it finishes there even if the peer moves meanwhile
    tap: bool = False  # the client audits this session: copy outputs to it (protocol.py, `tap`)
    compression: str = "auto"  # how its outputs are encoded (molink.dht.codec_policy): the client's choice
    client: str | None = None  # remote peer id that opened it (session_limits.client_of), if known
    opened_at: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def room(self) -> int:
        """New tokens this session may still add."""
        return self.max_length - self.span_session.seen_tokens


class SessionRegistry:
    def __init__(self, budget_tokens: int, max_sessions: int = 256, *, max_sessions_per_client: int | None = None,
                 max_session_tokens: int | None = None):
        self.budget_tokens = budget_tokens
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client  # None: no per-client cap
        self.max_session_tokens = max_session_tokens  # None: the whole budget
        self.sessions: dict[bytes, ActiveSession] = {}
        self.per_client: Counter[str] = Counter()
        self.reserved_tokens = 0

    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.reserved_tokens

    def add(self, session: ActiveSession) -> None:
        if session.session_id in self.sessions:
            raise ValueError("session id already in use")
        if len(self.sessions) >= self.max_sessions:
            raise CacheBudgetExceeded(f"peer already serves {self.max_sessions} sessions", "sessions")
        if (session.client is not None and self.max_sessions_per_client is not None
                and self.per_client[session.client] >= self.max_sessions_per_client):
            raise CacheBudgetExceeded(f"you already hold {self.per_client[session.client]} sessions on this peer "
                                      f"(max {self.max_sessions_per_client} per client)", "sessions_per_client")
        if self.max_session_tokens is not None and session.reserved_tokens > self.max_session_tokens:
            raise CacheBudgetExceeded(f"session asks for {session.reserved_tokens} cache tokens (batch x "
                                      f"max_length); this peer allows {self.max_session_tokens} per session",
                                      "session_tokens")
        if session.reserved_tokens > self.free_tokens:
            raise CacheBudgetExceeded(
                f"session needs cache for {session.reserved_tokens} tokens, peer has {self.free_tokens} free "
                f"of {self.budget_tokens}")
        self.sessions[session.session_id] = session
        self.reserved_tokens += session.reserved_tokens
        if session.client is not None:
            self.per_client[session.client] += 1

    def get(self, session_id: bytes) -> ActiveSession | None:
        return self.sessions.get(session_id)

    def remove(self, session_id: bytes) -> ActiveSession | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.reserved_tokens -= session.reserved_tokens
            if session.client is not None:
                self.per_client[session.client] -= 1
                if self.per_client[session.client] <= 0:
                    del self.per_client[session.client]
            session.span_session.close()  # free the KV tensors now, not when references die
        return session

    def __len__(self) -> int:
        return len(self.sessions)
