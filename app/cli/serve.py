"""`parley serve`: OpenAI- and llama.cpp-compatible HTTP server over Parley's engine and cache store.

Binds 127.0.0.1 unless told otherwise; any other address requires an API key
(clients send `Authorization: Bearer KEY`). Uses the same PARLEY_HOME (catalog,
caches) as the app and `parley chat`, so their caches are reused by content.
"""

from __future__ import annotations

import ipaddress
import logging

from app.errors import ParleyError


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve OpenAI and llama.cpp style HTTP endpoints (SillyTavern, openai client)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request but /health")
    p.set_defaults(handler=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    if not is_loopback(args.host) and not args.api_key:
        raise ParleyError(f"Serving on {args.host} would let anyone who can reach it use your model and read cached "
                          "conversations: give --api-key KEY (clients send `Authorization: Bearer KEY`), or bind 127.0.0.1.")
    if not 0 < args.port < 65536:
        raise ParleyError(f"--port {args.port} is not a port number (1-65535).")
    import uvicorn

    from app.serve.app import create_app
    from app.serve.bridge import EngineBridge

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bridge = EngineBridge(model=args.model, scheme=args.kv_scheme, budget_mb=args.budget_mb)
    app = create_app(bridge, api_key=args.api_key)
    print(f"parley serve: http://{args.host}:{args.port} (OpenAI: /v1, llama.cpp: /completion); ctrl+c stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0
