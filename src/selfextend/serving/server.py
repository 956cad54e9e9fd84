"""Running the HTTP server: the app over an engine, under uvicorn (the command line builds both)."""

from __future__ import annotations

import logging

import uvicorn

from .app import ServerOptions, create_app
from .engine import Engine


def serve(engine: Engine, options: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve `engine`'s model as `options.model_name` on http://host:port/v1 until interrupted."""
    logging.getLogger("selfextend.serving").info(
        "serving %s on http://%s:%d/v1 (%s; inputs up to %d tokens; key %s)", options.model_name, host, port,
        engine.planner.describe(), engine.planner.limit, "required" if options.api_key else "not required")
    uvicorn.run(create_app(engine, options), host=host, port=port, log_level=log_level)
