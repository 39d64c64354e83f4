"""The process `midgate coordinator serve` runs, assembled in one place from small builders.

Storage first (the MID key, the ledger, the registry and ledger-following dedup index: one instance each, shared by
every service), then the services that use it: ingest with its contribution gate, the MID's SuperLink with its fleet
front, and the HTTP endpoint (enrolment, the ledger's proofs and witnesses, members' statements, buyers' revenue,
metrics, the operator dashboard). Each builder takes the
settings and what it uses, nothing more. `CoordinatorProcess` enters them in dependency order on one exit stack, so
they stop in reverse order, also when a later one fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from fastapi import APIRouter

from coordinator.broker.config import device_ca_file
from coordinator.broker.logins import coordinator_password, coordinator_password_path, sync_broker_logins
from coordinator.broker.owners import BrokerFilesError
from coordinator.buyer.http import RevenueDesk
from coordinator.config import CoordinatorSettings
from coordinator.dashboard.auth import OperatorLogin
from coordinator.dashboard.http import dashboard_router
from coordinator.dashboard.pages import DashboardSources
from coordinator.dashboard.refusal_history import RefusalHistory
from coordinator.enrolment.enroller import Enroller
from coordinator.federation.job_ledger import JobLedger
from coordinator.federation.job_start import JobBook
from coordinator.federation.mid_superlink import MidSuperLink
from coordinator.gate.gate import ContributionGate, open_contribution_gate
from coordinator.ingest.metrics import IngestMetrics
from coordinator.ingest.mqtt import BrokerEndpoint
from coordinator.ingest.pipeline import IngestPipeline
from coordinator.ingest.service import IngestService
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.witnesses import WitnessDesk
from coordinator.market.dashboard_rows import buyer_job_rows
from coordinator.market.desk import JobDesk, MarketTerms
from coordinator.market.runner import FlowerJobLauncher, ServeManifests
from coordinator.market.store import MarketStore
from coordinator.mid_key import load_or_create_mid_key
from coordinator.policy.document import configured_policy
from coordinator.policy.ledger_records import PolicyLog
from coordinator.policy.strike_quorum import StrikePolicyInForce, StrikeQuorumLog
from coordinator.provenance.shelf import ManifestShelf
from coordinator.registry.device_keys import DeviceKeys
from coordinator.registry.ledger_records import log_enrolments
from coordinator.registry.store import Device, Registry
from coordinator.royalties.policy import RoyaltyPolicy
from coordinator.royalties.statement_http import StatementDesk
from coordinator.serve.http import HttpEndpoint, build_http_app
from coordinator.tasks.catalogue import TaskCatalogue
from protocol.enrolment import BrokerCredentials
from protocol.errors import Reason
from protocol.identity import SignerKey
from protocol.job_log import JobLogRecord
from protocol.ledger_api import PurposeList, PurposeTerm
from protocol.private_files import private_dir, private_file

log = logging.getLogger("midgate.serve")


@dataclass
class Storage:
    """The MID's durable state, opened once per process and shared by every service."""

    mid_key: SignerKey
    ledger: LedgerStore
    registry: Registry
    dedup: DedupIndex
    tasks: TaskCatalogue

    def close(self) -> None:
        self.tasks.close()
        self.dedup.close()
        self.registry.close()
        self.ledger.close()


def open_storage(settings: CoordinatorSettings) -> Storage:
    """Open (creating on first start: folders 0700, databases 0600) the MID key, ledger, registry and dedup index;
    log any enrolment a crash left redeemed but unlogged, before anything else appends."""
    private_dir(settings.data_dir)
    mid_key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
    ledger = LedgerStore.open(private_file(settings.ledger_path), mid_key)
    tasks = TaskCatalogue(
        settings.tasks_path, mid_key, time.time_ns() // 1_000_000
    )  # signs the built-ins at first start
    storage = Storage(mid_key, ledger, Registry(settings.registry_path), DedupIndex(settings.ingest_path), tasks)
    log_enrolments(storage.registry, storage.ledger)
    return storage


def build_pipeline(settings: CoordinatorSettings, storage: Storage) -> IngestPipeline:
    return IngestPipeline(
        mid=settings.mid,
        registry=storage.registry,
        ledger=storage.ledger,
        dedup=storage.dedup,
        mid_key=storage.mid_key,
        max_message_bytes=settings.ingest.max_message_bytes,
        default_rate_per_s=settings.ingest.rate_per_s,
        default_burst=settings.ingest.rate_burst,
        on_departed=departed_logins_sync(settings, storage.registry),
    )


def departed_logins_sync(settings: CoordinatorSettings, registry: Registry) -> Callable[[list[str]], None]:
    """After a member left: rewrite the broker's password file without its devices' logins and reload the broker.
    A failure is logged: the keys are revoked already (ingest refuses them), the broker merely still lets them in."""

    def departed(devices: list[str]) -> None:
        try:
            sync_broker_logins(registry, settings)
        except BrokerFilesError as error:
            log.error(
                "broker logins not rewritten after a departure", extra={"devices": str(devices), "reason": str(error)}
            )

    return departed


def build_gate(settings: CoordinatorSettings, storage: Storage, metrics: IngestMetrics) -> ContributionGate:
    """The contribution gate: reports are cross-checked with the round captures of the MID's own jobs."""
    dedup = storage.dedup
    return open_contribution_gate(
        mid=settings.mid,
        mid_key=storage.mid_key,
        store_path=settings.contributions_path,
        registry=storage.registry,
        jobs_dir=settings.jobs_dir,
        job_book_dir=settings.job_book_dir,
        grace_s=settings.federation.report_grace_s,
        poll_s=settings.federation.capture_poll_s,
        in_ledger=lambda key_id, seq: dedup.lookup(key_id, seq) is not None,
        metrics_registry=metrics.registry,
    )


def broker_endpoint(settings: CoordinatorSettings) -> BrokerEndpoint:
    """The coordinator's own broker login (its password file is created 0600 on first use)."""
    b = settings.broker
    return BrokerEndpoint(
        host=b.host,
        port=b.port,
        username=b.username,
        password=coordinator_password(coordinator_password_path(settings)),
        client_id=b.client_id,
        ca_file=str(b.ca_file) if b.tls and b.ca_file else None,
        keepalive_s=b.keepalive_s,
        mqtt5=b.mqtt5,
    )


def device_broker_credentials(settings: CoordinatorSettings) -> Callable[[str, str], BrokerCredentials]:
    """What an enrolment grant tells a device about the broker, given its login and fresh password: the broker's
    device-facing TLS listener and the CA to trust for it (`[broker] public_*`), whatever listener the coordinator
    itself uses (usually the plain loopback one, which devices cannot reach)."""
    b = settings.broker
    host = b.public_host or settings.broker_config.tls_hostnames[0]
    port = b.public_port or settings.broker_config.tls_port
    ca_file = device_ca_file(settings)
    if b.public_tls and not ca_file.exists():
        log.error("no broker CA for devices: enrolment fails until it exists", extra={"ca_file": str(ca_file)})

    def credentials(device_id: str, password: str) -> BrokerCredentials:
        # Read at each enrolment: `broker-config` may have written the CA after `serve` started.
        ca_pem = ca_file.read_text() if b.public_tls else ""
        return BrokerCredentials(
            host=host, port=port, tls=b.public_tls, ca_pem=ca_pem, username=device_id, password=password
        )

    return credentials


def broker_login_sync(settings: CoordinatorSettings, registry: Registry) -> Callable[[Device], None]:
    """After each enrolment: rewrite the broker's password file (when `broker-config` wrote one) and reload it."""

    def enrolled(device: Device) -> None:
        log.info("device enrolled", extra={"device": device.device_id, "member": device.member_id})
        try:
            sync_broker_logins(registry, settings)
        except BrokerFilesError as error:
            # The broker keeps the logins it had; this enrolment fails, and the agent's rerun is answered again.
            log.error("broker logins not rewritten", extra={"device": device.device_id, "reason": str(error)})
            raise

    return enrolled


def build_enroller(settings: CoordinatorSettings, storage: Storage, superlink: MidSuperLink | None) -> Enroller:
    return Enroller(
        settings.mid,
        storage.registry,
        storage.ledger,
        storage.mid_key,
        broker=device_broker_credentials(settings),
        on_enrolled=broker_login_sync(settings, storage.registry),
        max_body_bytes=settings.enrolment.max_body_bytes,
        federation=superlink,
    )


def build_policy_log(settings: CoordinatorSettings, storage: Storage) -> PolicyLog:
    """The MID policy's versions in the log, with a POLICY leaf appended now when the configured policy (the policy
    file, or `[royalties]`) differs from the latest logged one. A policy file that breaks policy (a fee above the
    cap) stops `serve` from starting; once running, a bad file is logged and the current version stays in force."""

    def stamp() -> object:
        try:
            found = settings.policy_path.stat()
        except FileNotFoundError:
            return None
        return (found.st_mtime_ns, found.st_size)

    policies = PolicyLog(storage.ledger, lambda: configured_policy(settings), stamp)
    policies.sync()
    return policies


def build_strike_quorum_log(storage: Storage, policies: PolicyLog) -> StrikeQuorumLog:
    """STRIKE_QUORUM leaves under the `[strikes]` of the policy version current at each look."""

    def strikes() -> StrikePolicyInForce:
        logged = policies.current() or policies.versions[0]
        return StrikePolicyInForce(logged.policy.strikes, logged.version)

    return StrikeQuorumLog(storage.ledger, storage.registry, strikes)


def policy_in_force_now(policies: PolicyLog) -> Callable[[], RoyaltyPolicy]:
    """The money policy in force now (the latest POLICY leaf), read at each call: what `GET /v1/member/knob-price`
    prices a knob under."""

    def policy() -> RoyaltyPolicy:
        logged = policies.current() or policies.versions[0]
        return logged.royalty()

    return policy


def purposes_in_force_now(policies: PolicyLog) -> Callable[[], PurposeList]:
    """The purpose vocabulary of the policy in force now, as `GET /v1/member/purposes` serves it."""

    def purposes() -> PurposeList:
        logged = policies.current() or policies.versions[0]
        terms = tuple(PurposeTerm(code=p.code, dpv=p.dpv, label=p.label) for p in logged.policy.purposes)
        return PurposeList(policy_version=logged.version, purposes=terms)

    return purposes


def settlement_policy(policies: PolicyLog) -> Callable[[JobLogRecord], RoyaltyPolicy]:
    """The policy a logged job is settled under: the version in force when it started (a change while it ran does
    not touch it); a job older than every POLICY leaf takes the first."""

    def policy(job: JobLogRecord) -> RoyaltyPolicy:
        logged = policies.at(job.started_ms) or policies.versions[0]
        return logged.royalty()

    return policy


def build_job_ledger(settings: CoordinatorSettings, storage: Storage, policies: PolicyLog) -> JobLedger:
    """What logs the jobs `job start` ran and settles the payments `job settle` recorded (both write the job book)."""
    return JobLedger(
        JobBook(settings.job_book_dir),
        settings.jobs_dir,
        storage.ledger,
        settlement_policy(policies),
        settings.royalties.currency,
    )


def build_revenue_desk(
    settings: CoordinatorSettings, storage: Storage, registered: MarketStore | None = None
) -> RevenueDesk:
    """Revenue reports signed by a key of `[buyers.keys]` or, with `registered`, by a buyer the operator registered
    (`coordinator buyer add`, not revoked)."""
    return RevenueDesk(
        settings.mid,
        settings.royalties.currency,
        settings.buyers.keys,
        storage.ledger,
        settings.buyers.max_body_bytes,
        manifests=ManifestShelf(settings.manifests_dir, storage.mid_key.verifier),
        registered=registered,
        departures=lambda: storage.registry.departures().values(),
    )


def build_job_desk(settings: CoordinatorSettings, storage: Storage, policies: PolicyLog) -> JobDesk:
    """Buyers' jobs: registered buyers and their jobs in market.sqlite, run on the MID's SuperLink when federation is
    on (without it jobs are requested and quoted, and acceptance is refused), quoted under the latest POLICY leaf,
    delivered with their provenance manifest. Jobs a previous run left mid-way are
    failed and refunded, or their settlement awaited again (JobDesk.recover)."""
    m = settings.market
    terms = MarketTerms(
        currency=settings.royalties.currency,
        policy=settings.royalties.policy(),
        validation_dir=settings.data_dir / "market" / "validation",
        quote_ttl_s=m.quote_ttl_s,
        max_validation_bytes=m.max_validation_bytes,
        dp_clipping_norm=m.dp_clipping_norm,
        dp_noise_multiplier=m.dp_noise_multiplier,
        join_timeout_s=m.join_timeout_s,
        round_timeout_s=m.round_timeout_s,
        offline_after_s=settings.ingest.heartbeat_offline_s,
        settle_timeout_s=m.settle_timeout_s,
    )
    launcher = FlowerJobLauncher(settings, storage.mid_key, policies) if settings.federation.enabled else None
    desk = JobDesk(
        MarketStore(settings.market_path),
        storage.tasks,
        storage.registry,
        storage.ledger,
        terms,
        launcher,
        policies=policies,
        manifests=ServeManifests(settings, storage.mid_key),
    )
    desk.recover()
    return desk


def close_job_desk(desk: JobDesk) -> None:
    desk.close()
    desk.store.close()


def build_member_desks(settings: CoordinatorSettings, storage: Storage) -> tuple[WitnessDesk, StatementDesk]:
    """The witness exchange (agents' cosignatures in, the witnessed checkpoint out) and members' proven statements,
    both over the registry's device keys."""
    devices = DeviceKeys(storage.registry)
    witnesses = WitnessDesk(storage.ledger, devices.witnesses, settings.witnesses.quorum_max)
    return witnesses, StatementDesk(settings.mid, storage.ledger, devices, witnesses)


def build_dashboard(
    settings: CoordinatorSettings, storage: Storage, metrics: IngestMetrics, on_refusal: Callable[[Reason], None]
) -> tuple[APIRouter, DashboardSources] | None:
    """The operator dashboard's routes (`[dashboard] enabled`) and what its pages read: serve's own registry,
    ledger and metrics (with the minute samples of its refusal counters)."""
    if not settings.dashboard.enabled:
        return None
    sources = DashboardSources(
        mid=settings.mid,
        registry=storage.registry,
        ledger=storage.ledger,
        book=JobBook(settings.job_book_dir),
        jobs_dir=settings.jobs_dir,
        metrics=metrics.registry,
        offline_after_s=settings.ingest.heartbeat_offline_s,
        history=RefusalHistory(metrics.registry),
    )
    login = OperatorLogin(settings.operator_password_path, float(settings.dashboard.session_ttl_s))
    if not login.configured:
        log.warning(
            "no operator password: the dashboard refuses every login until `midgate coordinator operator passwd`",
            extra={"file": str(settings.operator_password_path)},
        )
    return dashboard_router(sources, login, on_refusal, secure_cookie=settings.dashboard.secure_cookie), sources


class CoordinatorProcess:
    """`async with CoordinatorProcess(settings) as process: await process.run()`; `stop()` ends `run()`."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics()
        self.superlink: MidSuperLink | None = None
        self.job_ledger: JobLedger | None = None
        self.http: HttpEndpoint | None = None
        self.dashboard: DashboardSources | None = None
        self._stopped = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> CoordinatorProcess:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            self.storage = await asyncio.to_thread(open_storage, s)
            stack.callback(self.storage.close)
            self.policies = await asyncio.to_thread(build_policy_log, s, self.storage)
            self.strike_quorum = await asyncio.to_thread(build_strike_quorum_log, self.storage, self.policies)
            pipeline = await asyncio.to_thread(build_pipeline, s, self.storage)
            gate = None
            if s.federation.enabled:
                gate = await asyncio.to_thread(build_gate, s, self.storage, self.metrics)
                stack.callback(gate.close)
            ingest = IngestService(
                settings=s,
                mid_key=self.storage.mid_key,
                ledger=self.storage.ledger,
                pipeline=pipeline,
                gate=gate,
                metrics=self.metrics,
                broker=broker_endpoint(s),
            )
            self.ingest = await stack.enter_async_context(ingest)
            if s.federation.enabled:
                # Before the HTTP endpoint: enrolment registers devices' Flower keys with this SuperLink.
                superlink = MidSuperLink(s)
                stack.push_async_callback(asyncio.to_thread, superlink.stop)
                await asyncio.to_thread(superlink.start)
                self.superlink = superlink
                log.info("superlink started", extra={"address": superlink.public_address})
                self.job_ledger = build_job_ledger(s, self.storage, self.policies)
            if s.enrolment.enabled:
                witnesses, statements = await asyncio.to_thread(build_member_desks, s, self.storage)
                dashboard = build_dashboard(s, self.storage, self.metrics, self._count_refusal)
                self.dashboard = dashboard[1] if dashboard else None
                market = await asyncio.to_thread(build_job_desk, s, self.storage, self.policies)
                stack.push_async_callback(asyncio.to_thread, close_job_desk, market)
                if self.dashboard is not None:
                    self.dashboard.buyer_jobs = functools.partial(buyer_job_rows, market.store)
                app = build_http_app(
                    enroller=build_enroller(s, self.storage, self.superlink),
                    ledger=self.storage.ledger,
                    revenue=build_revenue_desk(s, self.storage, market.store),
                    metrics=self.metrics.registry,
                    on_refusal=self._count_refusal,
                    witnesses=witnesses,
                    statements=statements,
                    tasks=self.storage.tasks,
                    dashboard=dashboard[0] if dashboard else None,
                    market=market,
                    knob_policy=(policy_in_force_now(self.policies), s.royalties.currency),
                    purposes=purposes_in_force_now(self.policies),
                )
                self.http = await stack.enter_async_context(HttpEndpoint(app, s.enrolment.host, s.enrolment.port))
            self._stack = stack.pop_all()
        addresses = self.addresses()
        log.info("ready: %s", ", ".join(f"{name} {where}" for name, where in addresses.items()), extra=addresses)
        return self

    def addresses(self) -> dict[str, str]:
        """Where the started process is reached: its HTTP endpoint, the broker ingest reads (its connection is
        logged apart, with every failure's reason), the SuperLink devices connect to."""
        s = self.settings
        found = {"mid": s.mid, "broker": f"{'mqtts' if s.broker.tls else 'mqtt'}://{s.broker.host}:{s.broker.port}"}
        if self.http is not None:
            found["http"] = f"http://{s.enrolment.host}:{self.http.port}"
        if self.superlink is not None:
            found["superlink"] = self.superlink.public_address
        return found

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _count_refusal(self, reason: Reason) -> None:
        self.metrics.rejected.labels(reason=str(reason)).inc()

    def stop(self) -> None:
        self._stopped.set()
        self.ingest.stop()

    async def run(self) -> None:
        """Ingest, and beside it the followers of the policy file, the strike quorum and the job book (federation
        on) and the dashboard's refusal sampler and first read of the log (dashboard on), until `stop()`."""
        helpers: list[Awaitable[object]] = [
            asyncio.create_task(self.policies.run(self._stopped)),
            asyncio.create_task(self.strike_quorum.run(self._stopped)),
        ]
        if self.job_ledger is not None:
            helpers.append(asyncio.create_task(self.job_ledger.run(self._stopped)))
        if self.dashboard is not None:
            if self.dashboard.history is not None:
                helpers.append(asyncio.create_task(self.dashboard.history.run(self._stopped)))
            # The digest's first read of the whole log, now rather than at the operator's first page.
            helpers.append(asyncio.create_task(asyncio.to_thread(self.dashboard.refreshed)))
        try:
            await self.ingest.run()
        finally:
            self._stopped.set()
            for helper in helpers:
                with contextlib.suppress(Exception):
                    await helper


async def serve(settings: CoordinatorSettings) -> None:
    """Run until SIGTERM or SIGINT."""
    async with CoordinatorProcess(settings) as process:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.stop)
        await process.run()
