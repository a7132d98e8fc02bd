"""The HTTP floor: a FastAPI app whose one route reads the raw body and sends it back.

Served the way `optserve serve` serves optserve (`uvicorn.run` with the same options: uvicorn's
default loop and HTTP implementations, log level warning, 30 s graceful shutdown), so an echo of
a push's payload costs what the HTTP stack alone costs. `python bench/echo_app.py --port N`.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response


def create_app() -> FastAPI:
    app = FastAPI(title="echo")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(body, 200, media_type=request.headers.get("content-type"))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    # The options optserve.cli.serve passes to uvicorn.run.
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
