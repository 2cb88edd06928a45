"""The HTTP server (FastAPI): OpenAI-compatible API, ``/cache/*`` controller API, ``/metrics``.

``create_app(llm, settings)`` builds the app around a loaded :class:`~kvcellar.llm.LLM`;
``run(settings)`` loads the model and serves it with uvicorn (what ``kvcellar serve`` calls).
This package is the only place that imports FastAPI.
"""

from kvcellar.server.app import create_app, run

__all__ = ["create_app", "run"]
