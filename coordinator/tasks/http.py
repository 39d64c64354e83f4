"""The MID's tasks over HTTP, read-only and public: what a device fetches before it trains, what a buyer may ask for.

    GET /v1/tasks                  {"tasks": [{"task": "id@version", "kind", "description", "added_ms",
                                               "envelope": <the signed spec, a DSSE envelope as a JSON string>}]}
    GET /v1/tasks/{id}@{version}   the signed spec's envelope bytes (application/vnd.dsse.envelope.v1+json)

An unknown or malformed task name is refused as `unknown_task` (404). The signature, not the transport, is what a
device trusts (docs/protocol.md, "Task specs").
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from coordinator.http_refusals import refusal
from coordinator.tasks.catalogue import TaskCatalogue
from protocol.errors import ProtocolError, Reason
from protocol.tasks.spec import UnknownTaskError

TASKS_PATH = "/v1/tasks"
ENVELOPE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
_TASK_KEY = re.compile(r"([a-z][a-z0-9-]{0,63})@([1-9][0-9]{0,6})")


def task_path(task_id: str, version: int) -> str:
    return f"{TASKS_PATH}/{task_id}@{version}"


def tasks_router(catalogue: TaskCatalogue, on_refusal: Callable[[Reason], None] = lambda reason: None) -> APIRouter:
    router = APIRouter()

    @router.get(TASKS_PATH)
    async def tasks() -> Response:
        entries = await asyncio.to_thread(catalogue.list)
        return JSONResponse(
            {
                "tasks": [
                    {
                        "task": t.spec.key,
                        "kind": str(t.spec.kind),
                        "description": t.spec.description,
                        "added_ms": t.added_ms,
                        "envelope": t.envelope.decode("ascii"),
                    }
                    for t in entries
                ]
            }
        )

    @router.get(TASKS_PATH + "/{key}")
    async def task(key: str) -> Response:
        try:
            found = _TASK_KEY.fullmatch(key)
            if found is None:
                raise UnknownTaskError("not a task name (id@version)", found=key[:80])
            entry = await asyncio.to_thread(catalogue.get, found.group(1), int(found.group(2)))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return Response(entry.envelope, media_type=ENVELOPE_MEDIA_TYPE)

    return router
