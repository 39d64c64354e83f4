"""The coordinator's HTTP endpoint: every router mounted here, and the uvicorn server's lifetime.

Routers: enrolment (coordinator/enrolment/http.py), the ledger's checkpoints, proofs and witness exchange
(coordinator/ledger/http.py), members' proven statements (coordinator/royalties/statement_http.py), buyers' revenue
reports (coordinator/buyer/http.py), the MID's signed task specs (coordinator/tasks/http.py), buyers' jobs
(coordinator/market/http.py), Prometheus metrics and the operator dashboard (coordinator/dashboard/http.py, built by
the composition root); the OpenAPI document of the API (not the dashboard's pages) at `/v1/openapi.json`.
TLS is terminated in front of it (a reverse proxy) outside loopback demos. Every refusal is counted through
`on_refusal`, as ingest's rejections are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from types import TracebackType

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from coordinator.buyer.http import RevenueDesk, revenue_router
from coordinator.enrolment.enroller import Enroller
from coordinator.enrolment.http import enrolment_router
from coordinator.ledger.http import ledger_router
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.witnesses import WitnessDesk
from coordinator.market.desk import JobDesk
from coordinator.market.http import market_router
from coordinator.royalties.knob_http import knob_router
from coordinator.royalties.policy import RoyaltyPolicy
from coordinator.royalties.statement_http import StatementDesk, statement_router
from coordinator.tasks.catalogue import TaskCatalogue
from coordinator.tasks.http import tasks_router
from protocol.errors import Reason
from protocol.ledger_api import PurposeList

OPENAPI_PATH = "/v1/openapi.json"


def build_http_app(
    *,
    enroller: Enroller,
    ledger: LedgerStore,
    revenue: RevenueDesk,
    metrics: CollectorRegistry,
    on_refusal: Callable[[Reason], None],
    witnesses: WitnessDesk | None = None,
    statements: StatementDesk | None = None,
    tasks: TaskCatalogue | None = None,
    market: JobDesk | None = None,
    dashboard: APIRouter | None = None,
    knob_policy: tuple[Callable[[], RoyaltyPolicy], str] | None = None,
    purposes: Callable[[], PurposeList] | None = None,
) -> FastAPI:
    """The app `serve` runs; without `witnesses`, `statements`, `tasks`, `market`, `dashboard` and `knob_policy` (tests
    of other routers; the operator dashboard off) their routes are absent. Its OpenAPI document is served at
    OPENAPI_PATH."""
    app = FastAPI(title="midgate coordinator", docs_url=None, redoc_url=None, openapi_url=OPENAPI_PATH)
    app.include_router(enrolment_router(enroller, on_refusal))
    app.include_router(ledger_router(ledger, witnesses, on_refusal))
    app.include_router(revenue_router(revenue, on_refusal))
    if statements is not None:
        app.include_router(statement_router(statements, on_refusal))
    if tasks is not None:
        app.include_router(tasks_router(tasks, on_refusal))
    if dashboard is not None:
        app.include_router(dashboard, include_in_schema=False)
    if market is not None:
        app.include_router(market_router(market, on_refusal))
    if knob_policy is not None:
        app.include_router(knob_router(*knob_policy, on_refusal, purposes))

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the process owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpEndpoint:
    """`async with HttpEndpoint(app, host, port)`: serving once entered (the bound port is `port`), stopped on exit."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def __aenter__(self) -> HttpEndpoint:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("HTTP endpoint did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
