"""`foundry serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse
import os
import sys

from foundry.cli.engine_flags import add_engine_flags, engine_options
from foundry.cli.generate import add_kv_cache_flag
from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

ENV_KEY = "FOUNDRY_API_KEY"


def _cmd_serve(args: argparse.Namespace) -> None:
    from foundry import hub
    from foundry.cli.engine_flags import build_engine
    from foundry.serve import ServeConfig
    from foundry.serve.server import serve

    keys = list(args.api_key or [])
    if not keys and os.environ.get(ENV_KEY):
        keys = [os.environ[ENV_KEY]]
    model_dir = hub.resolve_model_dir(args.model)  # a wrong path fails now, before the server starts
    kv_cache_memory = None
    if args.kv_cache_memory is not None:  # a bad size fails now too
        from foundry.hub.weights import parse_size

        try:
            kv_cache_memory = parse_size(args.kv_cache_memory)
        except UserError as exc:
            raise UserError(f"--kv-cache-memory: {exc}") from None
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    config = ServeConfig(model_name=args.served_model_name or args.model, host=args.host, port=args.port,
                         api_keys=keys, max_queued_requests=args.max_queued_requests, max_tokens=args.max_tokens,
                         max_n=args.max_n, max_body_bytes=args.max_body_bytes, shutdown_grace_s=args.shutdown_grace,
                         playground=not args.no_playground)
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it may use it "
              f"(set --api-key or {ENV_KEY})", file=sys.stderr)
    serve(config, lambda: build_engine(str(model_dir), kv_cache_memory=kv_cache_memory,
                                       max_batch_size=args.max_batch_size, **engine_options(args)))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` verb."""
    p = add_verb(sub, "serve", _cmd_serve, "Serve a model over an OpenAI-compatible HTTP API "
                 "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).")
    p.add_argument("model", help="model directory, run directory or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (repeatable; default: "
                        f"${ENV_KEY} if set, else no key). Prefer the variable: flags show in `ps`")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-queued-requests", type=int, default=64,
                   help="sequences (a request's n choices count n) that may wait for a KV-cache slot; a request "
                        "arriving when that many wait is answered 429 with Retry-After")
    add_kv_cache_flag(p)
    p.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="the most sequences (choices) generating at once (default: 64); the KV cache may "
                        "hold fewer")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most tokens one choice may generate")
    p.add_argument("--max-n", type=int, default=8, help="the most choices (n) one request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    p.add_argument("--no-playground", action="store_true",
                   help="do not serve the browser chat page at / and /playground (an API-only server)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may take to finish before they are stopped")
    # Serving is a long session: on a CPU the compiled decode step is on unless --eager (/health answers 503
    # while it compiles: tens of seconds the first time on two cores, then cached; benchmarks/decode.py).
    add_engine_flags(p, compiled_by_default=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m foundry.cli.serve MODEL ...`: the verb on its own (until cli/main.py lists it)."""
    parser = argparse.ArgumentParser(prog="foundry")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.handler(args)
    except UserError as exc:
        print(f"foundry serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
