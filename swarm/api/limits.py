"""What a request may ask for, and the error shape it gets when it asks too much.

Kept free of torch and starlette so the CLI can show these defaults without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_tokens: int = 512  # cap on max_tokens per request
    max_prompt_tokens: int = 2048
    max_concurrent: int = 8  # generations at once; more get 429 at once instead of queueing
    request_timeout: float = 120.0  # whole-request deadline (seconds): 504 past it
    max_body_bytes: int = 1 << 20  # request body size: 413 past it


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
