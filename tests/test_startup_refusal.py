"""server.QuietRefusal: a startup the settings forbid ends with its advice, any other startup
failure with its traceback (the processes themselves: tests/test_auth.py, tests/test_cluster.py)."""

from __future__ import annotations

import traceback

import pytest

from optserve.server import QuietRefusal
from optserve.store.errors import StartupRefused


def failing_app(error: BaseException):
    """A lifespan that fails the way Starlette's does: report the traceback, then raise."""

    async def app(scope, receive, send) -> None:
        await receive()
        try:
            raise error
        except BaseException:
            await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
            raise

    return app


async def run_lifespan(app) -> tuple[list[dict], BaseException | None]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "lifespan.startup"}

    async def send(message: dict) -> None:
        sent.append(message)

    try:
        await QuietRefusal(app)({"type": "lifespan"}, receive, send)
    except BaseException as error:  # what the server would see
        return sent, error
    return sent, None


@pytest.mark.anyio
async def test_a_refusal_is_its_message_alone() -> None:
    sent, raised = await run_lifespan(failing_app(StartupRefused("set OPTSERVE_X=1")))
    assert raised is None
    refusal = {"type": "lifespan.startup.failed", "message": "not starting: set OPTSERVE_X=1"}
    assert sent == [refusal]


@pytest.mark.anyio
async def test_any_other_failure_keeps_its_traceback() -> None:
    sent, raised = await run_lifespan(failing_app(ValueError("a bug")))
    assert isinstance(raised, ValueError)
    assert len(sent) == 1 and sent[0]["type"] == "lifespan.startup.failed"
    assert "Traceback" in sent[0]["message"] and "ValueError: a bug" in sent[0]["message"]


@pytest.mark.anyio
async def test_a_good_startup_passes_through() -> None:
    async def app(scope, receive, send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    sent, raised = await run_lifespan(app)
    assert raised is None and sent == [{"type": "lifespan.startup.complete"}]
