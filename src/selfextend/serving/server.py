"""Starting the server: load the model once, build the engine and app, run uvicorn on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .. import models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder, .gguf file, cached hub id or 'testbed' "
                                        f"(default: embedded {models.DEFAULT_MODEL}); fixed for the server's life")
    parser.add_argument("--served-model-name", help="the name clients give as `model` (default: from --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("SELFEXTEND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $SELFEXTEND_API_KEY, else none)")
    parser.add_argument("--group-size", type=int, help="fix G for every request (with --window); default: planned")
    parser.add_argument("--window", type=int, help="fix W for every request (with --group-size)")
    parser.add_argument("--method", default="auto", choices=["auto", "selfextend", "string"],
                        help="position map per request: auto (SelfExtend, or STRING inside the training length where "
                             "the profile measured it better), selfextend, or string (inside the training length)")
    parser.add_argument("--shifted-offset", type=int, metavar="S", help="STRING's S (default: training length / 3)")
    parser.add_argument("--local-window", type=int, metavar="w", help="STRING's w (default 128)")
    parser.add_argument("--effective-length", type=int, metavar="E",
                        help="plan against this length instead of the model's measured profile")
    parser.add_argument("--chat-template", help="Jinja chat template file, for models without one")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429")
    parser.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    parser.add_argument("--prefix-cache-mb", type=float, default=2048,
                        help="memory for kept prefixes, least recently used dropped first (0: no reuse)")
    parser.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill tokens per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn

        from .app import ServerOptions, create_app
        from .engine import Engine, RequestPlanner
        from .metrics import Metrics
    except ImportError as error:
        raise SystemExit(f"selfextend serve needs the serve extra: pip install 'selfextend[serve]' ({error})")
    from ..cli import CommandError

    for flag, value in (("--max-queue", args.max_queue), ("--max-tokens-cap", args.max_tokens_cap),
                        ("--default-max-tokens", args.default_max_tokens), ("--chunk-size", args.chunk_size),
                        ("--max-body-mb", args.max_body_mb)):
        if value <= 0:
            raise CommandError(f"{flag} must be positive, got {value}")
    if args.prefix_cache_mb < 0:
        raise CommandError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise CommandError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    try:
        source = models.resolve(args.model)
    except models.ModelNotFoundError as error:
        raise CommandError(str(error)) from error
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, device=args.device, dtype=args.dtype)
    try:
        planner = RequestPlanner(model, args.group_size, args.window, args.effective_length, args.method,
                                 args.shifted_offset, args.local_window)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    engine = Engine(model, tokenizer, planner, Metrics(), chunk_size=args.chunk_size, max_queue=args.max_queue,
                    prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    name = args.served_model_name or args.model or models.DEFAULT_MODEL
    options = ServerOptions(name, args.api_key, int(args.max_body_mb * 2**20), args.max_tokens_cap,
                            args.default_max_tokens, template)
    planned = (f"G={args.group_size}, W={args.window} fixed" if planner.fixed else "STRING for every request"
               if args.method == "string" else
               f"planned per request against {planner.effective_length or planner.train_length} tokens")
    logging.getLogger("selfextend.serving").info(
        "serving %s on http://%s:%d/v1 (%s; inputs up to %d tokens; key %s)", name, args.host, args.port, planned,
        planner.limit, "required" if args.api_key else "not required")
    uvicorn.run(create_app(engine, options), host=args.host, port=args.port, log_level=args.log_level)
