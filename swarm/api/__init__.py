"""The public demo endpoint: an OpenAI-compatible API, a web chat page and a live swarm map.

    molink-swarm serve-api --model M --initial-peers ADDR [--host 127.0.0.1] [--port 8000]
    molink-swarm demo --serve

`ApiServer` (app.py) serves one `DistributedModelForCausalLM` over HTTP; `Engine` (engine.py) runs
the generations; limits.py holds the limits and the OpenAI error shape; openai_compat.py speaks
OpenAI's shapes; swarm_map.py answers /api/swarm; static/ holds the two pages (plain HTML + JS, no
build step). Names are imported lazily: the CLI reads `Limits` without loading torch or starlette.
"""

from __future__ import annotations

_EXPORTS = {"ApiServer": "app", "create_app": "app", "Engine": "engine", "ApiError": "limits", "Limits": "limits"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f"molink.swarm.api.{_EXPORTS[name]}"), name)
