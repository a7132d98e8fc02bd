"""`optserve serve`: run the API under uvicorn with settings from OPTSERVE_* and flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import checkpoint, keys_cli
from .config import Settings

# The server (uvicorn, the app, numba's kernels) is imported by the commands that run it, so a
# client command such as `optserve checkpoint` starts in a fraction of a second.


def serve(args: argparse.Namespace) -> None:
    from .server import run

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    run(Settings(**overrides))


def openapi_document() -> str:
    """The API's OpenAPI document as stable text (sorted keys), as committed in clients/."""
    from .app import create_app

    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"


def openapi(args: argparse.Namespace) -> None:
    text = openapi_document()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="optserve", description="Optimizer as a service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the HTTP API")
    serve_parser.add_argument(
        "--host", help="address to bind (default: OPTSERVE_HOST or 127.0.0.1)"
    )
    serve_parser.add_argument("--port", type=int, help="port (default: OPTSERVE_PORT or 8000)")
    serve_parser.set_defaults(run=serve)
    openapi_parser = commands.add_parser("openapi", help="print the OpenAPI document")
    openapi_parser.add_argument("--output", help="write it to this file instead")
    openapi_parser.set_defaults(run=openapi)
    checkpoint.add_parser(commands)
    keys_cli.add_parser(commands)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
