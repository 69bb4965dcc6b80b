"""Build the grpc.aio server from settings; start; stop; signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from agentplane.v1 import (
    budget_pb2,
    budget_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.asyncio import AsyncSession as DbSession

from .api.budget_service import BudgetService, UsageService
from .api.errors import DecodeGuard
from .api.session_service import SessionService
from .api.webhook_service import WebhookService, render
from .config import Settings, is_loopback
from .errors import ConfigError, InvalidArgument
from .gateway.proxy import MeteringGateway
from .health import DATABASE, WRITES, Health, PoolCheck
from .money.ledger import BudgetReader
from .money.pricing import PriceTable
from .operator_gauges import watch_server
from .sandbox.host_dirs import default_host_dir, register
from .sandbox.sandboxes import Sandboxes, SandboxUnavailable
from .sessions.build import (
    BUNDLED_CLI,
    LaunchConfig,
    LeaseConfig,
    PoolConfig,
    RetryPolicy,
    RunnerConfig,
    SessionsConfig,
    build_sessions,
)
from .sessions.manager import SessionManager
from .sessions.parts import SessionParts
from .sessions.records.usage import UsageReader
from .store.diagnosis import LISTEN_SETTING, SETTING, explain
from .store.engine import create_engine, on_connection_failure, sessionmaker
from .store.notify import SELF_CHECK_S, Bus, Listener
from .store.pools import PoolSize, close_idle_connections
from .telemetry.budget_watch import BudgetWatch
from .telemetry.observer import TelemetryObserver
from .telemetry.rpc import CallSpans
from .telemetry.setup import ContentPolicy, EndpointUnavailable, Telemetry
from .tenants import MAX_INPUT_TOTAL_BYTES, TenantChanges, TenantRegistry
from .tenants.reload import TenantsReloader
from .tls import CertificateFiles, certificate_files
from .webhooks.listing import DeliveryReader
from .webhooks.metrics import WebhookMetrics
from .webhooks.outbox import WebhookOutbox
from .webhooks.sender import SenderConfig, WebhookSender

log = logging.getLogger(__name__)


def load_tenants(settings: Settings) -> TenantRegistry:
    if settings.tenants_file is None:
        return TenantRegistry.dev()
    return TenantRegistry.load(settings.tenants_file)


def tenant_checks(
    settings: Settings, check_model: Callable[[str], object]
) -> Callable[[TenantRegistry], None]:
    """What the server checks of a tenants file beyond its own rules, at start and before
    a reload applies it: warm-pool and fallback models it can price, certificate bindings
    it can verify. Raises ConfigError."""

    def check(registry: TenantRegistry) -> None:
        for tenant in registry.tenants.values():
            priced = [("fallback_models", m) for m in tenant.fallback_models]
            if tenant.warm_pool_size > 0 and tenant.warm_pool_model:
                priced.append(("warm_pool_model", tenant.warm_pool_model))
            for setting, model in priced:
                try:
                    check_model(model)
                except InvalidArgument as exc:
                    raise ConfigError(f"tenants.{tenant.name}.{setting}", exc.description) from None
            if tenant.binds_certificates and settings.tls_client_ca_file is None:
                key = "client_cert_sans" if tenant.client_cert_sans else "client_cert_subjects"
                raise ConfigError(
                    f"tenants.{tenant.name}.{key}",
                    "binding a tenant to client certificates needs mTLS: set "
                    "AGENTPLANE_TLS_CLIENT_CA_FILE (and the TLS certificate and key)",
                )

    return check


def _engine(settings: Settings, purpose: str, pool: PoolSize) -> AsyncEngine:
    return create_engine(
        settings.database_url,
        statement_timeout_s=settings.db_statement_timeout_s,
        pool_timeout_s=settings.db_pool_timeout_s,
        pool=pool,
        purpose=purpose,
        pooled=settings.pooled,
    )


def pool_sizes(settings: Settings) -> tuple[PoolSize, PoolSize]:
    """The callers' pool and the running sessions' (writes) pool, as the settings say."""
    idle = settings.db_idle_timeout_s
    return (
        PoolSize(settings.db_pool_size, settings.db_pool_overflow, idle),
        PoolSize(settings.db_write_pool_size, settings.db_write_pool_overflow, idle),
    )


async def _sandboxes(settings: Settings, cli: Path, gateway: MeteringGateway) -> Sandboxes:
    """The sessions' sandboxes; ConfigError (exit 2) where this host cannot build them."""
    socket = gateway.unix_socket
    assert socket is not None
    try:
        return await asyncio.to_thread(
            functools.partial(
                Sandboxes.open,
                settings.work_dir,
                cli,
                socket,
                gateway.port,
                uid_range=settings.sandbox_uids,
                uid_lock_dir=(settings.host_dir or default_host_dir()) / "uids",
            )
        )
    except SandboxUnavailable as exc:
        raise sandbox_unavailable(exc) from None


def sandbox_unavailable(exc: SandboxUnavailable) -> ConfigError:
    """What `serve` and `check-config` say where this host cannot sandbox sessions."""
    return ConfigError(
        "AGENTPLANE_SANDBOX",
        f"cannot sandbox sessions: {exc}; or set AGENTPLANE_SANDBOX=none to run agents "
        "unsandboxed (unsafe with more than one tenant)",
    )


def price_table(settings: Settings) -> PriceTable:
    """The packaged price table, with AGENTPLANE_PRICES_FILE over it."""
    prices = PriceTable.load()
    if settings.prices_file is not None:
        prices = prices.override(settings.prices_file)
    return prices


def telemetry_for(settings: Settings) -> Telemetry:
    """The telemetry the settings ask for (OTEL_*, AGENTPLANE_PROMETHEUS_PORT, ...).

    Here, not in telemetry/, so that telemetry never depends on the server's settings.
    ConfigError when /metrics cannot listen (exit 2, as for the gRPC port)."""
    try:
        return Telemetry.create(
            settings.otel,
            content=ContentPolicy(settings.trace_content, settings.trace_content_max_chars),
            prometheus=settings.prometheus_address,
        )
    except EndpointUnavailable as exc:
        raise ConfigError(
            "AGENTPLANE_PROMETHEUS_PORT",
            f"{exc} for /metrics: another server has the port, or the host is not an "
            "address of this machine; choose a free port, or unset it (no /metrics)",
        ) from None


@dataclass(kw_only=True)
class App:
    """A running agentplane server. Whatever it opened is closed by `stop`, or at once
    when `start` fails part-way."""

    settings: Settings
    tenants: TenantRegistry
    server: grpc.aio.Server
    health: Health
    sessions: SessionManager
    engine: AsyncEngine
    gateway: MeteringGateway
    telemetry: Telemetry
    port: int
    _resources: contextlib.AsyncExitStack
    # PostgreSQL: the LISTEN for what other replicas tell this one (None on SQLite).
    notifications: Listener | None = None
    budgets: BudgetReader | None = None
    # The running sessions' own pool (see SessionManager).
    upkeep_engine: AsyncEngine | None = None
    # TLS on the gRPC port (None: plaintext); the tenants file's watcher (None: dev mode).
    certificates: CertificateFiles | None = None
    reloader: TenantsReloader | None = None
    # Each tenant's budget today, for the budget gauges.
    budget_watch: BudgetWatch | None = None
    # Sends the webhooks' outbox (every replica runs one).
    webhooks: WebhookSender | None = None
    _ready_task: asyncio.Task[None] | None = None
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        tenants: TenantRegistry | None = None,
        telemetry: Telemetry | None = None,
    ) -> App:
        """Bind, start serving (health NOT_SERVING), then run the readiness checks in the
        background so probes can watch the transition. `telemetry` (default: as the
        settings say) is the App's own: stop() flushes and closes it. If anything fails,
        what was opened so far is closed before the error propagates."""
        tenants = tenants or load_tenants(settings)
        certificates = certificate_files(settings)  # checked before anything opens
        settings.check_exposure(tenants.dev_mode)
        if tenants.dev_mode and not is_loopback(settings.listen_host):
            log.warning(
                "AGENTPLANE_ALLOW_UNAUTHENTICATED=1: no AGENTPLANE_TENANTS_FILE and listening "
                "on %s: ANYONE who reaches this address is served without auth (dev mode, "
                "one `default` tenant) and can run agents on this host and spend its budget",
                settings.listen,
            )
        elif tenants.dev_mode:
            log.warning("no AGENTPLANE_TENANTS_FILE: dev mode, one `default` tenant, no auth")
        if not settings.sandbox:
            log.warning(
                "AGENTPLANE_SANDBOX=none: agents run unsandboxed, with the server's view of "
                "this host (its files, processes and network); health `agentplane.sandbox` "
                "is NOT_SERVING"
            )
        resources = contextlib.AsyncExitStack()  # the app's own from here: stop() closes it
        try:
            app = await cls._open(resources, settings, tenants, telemetry, certificates)
        except BaseException:
            await resources.aclose()
            raise
        app._ready_task = asyncio.create_task(app._start_up())
        log.info(
            "agentplane listening on %s (%s)",
            settings.listen.rsplit(":", 1)[0] + f":{app.port}",
            "plaintext"
            if certificates is None
            else "TLS, client certificates required"
            if certificates.mutual
            else "TLS",
        )
        return app

    @classmethod
    async def _open(
        cls,
        resources: contextlib.AsyncExitStack,
        settings: Settings,
        tenants: TenantRegistry,
        telemetry: Telemetry | None,
        certificates: CertificateFiles | None,
    ) -> App:
        """Open every part in order, each registered in `resources` to be closed in
        reverse order."""
        telemetry = telemetry or telemetry_for(settings)
        resources.push_async_callback(asyncio.to_thread, telemetry.shutdown)  # flushes
        health = Health()
        store = _open_store(resources, settings, health)
        await health.init(sandboxed=settings.sandbox, listens=store.notifications is not None)
        resources.push_async_callback(health.shutdown)
        settings.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _open_work_dir(settings.work_dir, tenants)
        gateway = await _open_gateway(resources, settings, health, telemetry)
        sandboxes = await _open_sandboxes(resources, settings, gateway)
        observer = TelemetryObserver(telemetry)
        observer.declare_tenants(tenants.tenants)
        owner = f"agentplane-{uuid.uuid4().hex[:12]}"
        sessions = build_sessions(
            sessions_config(settings, tenants, owner),
            SessionParts.open(
                store.db,
                settings.max_sessions,
                upkeep_db=store.upkeep_db,
                observer=observer,
                webhooks=WebhookOutbox(tenants, render),
                on_full=health.full,
            ),
            gateway,
            sandboxes,
            tenants.tenants.values(),
            not_ready=health.refusal,
        )
        check_tenants = tenant_checks(settings, sessions.launcher.check_model)
        check_tenants(tenants)
        # A pool even with no tenant's pool configured: a reload may add one.
        assert sessions.pool is not None
        resources.push_async_callback(sessions.pool.close)
        # Its own pool's connections (the upkeep pool): receivers never hold callers' ones.
        webhooks = WebhookSender(
            store.upkeep_db,
            tenants,
            SenderConfig(owner=owner, timeout_s=settings.webhook_timeout_s),
            WebhookMetrics(telemetry.meter_provider),
        )
        budgets = BudgetReader(store.db)
        budget_watch = watch_server(
            telemetry,
            tenants=tenants,
            capacity=sessions.capacity,
            pool=sessions.pool,
            budgets=budgets,
            bus=store.bus,
            engines={"main": store.engine, "upkeep": store.upkeep_engine},
            health=health,
        )
        reloader = None
        if settings.tenants_file is not None and not tenants.dev_mode:
            reloader = TenantsReloader(
                settings.tenants_file,
                tenants,
                check=check_tenants,
                applied=_follow_tenants(settings, sessions, (observer, budget_watch)),
                status=health.tenants,
            )
        server = _grpc_server(telemetry, tenants, sessions, store.db, budgets, health)
        resources.push_async_callback(server.stop, 1.0)
        port = _bind(server, settings, certificates)
        await server.start()
        app = cls(
            settings=settings,
            tenants=tenants,
            server=server,
            health=health,
            sessions=sessions,
            engine=store.engine,
            gateway=gateway,
            telemetry=telemetry,
            port=port,
            _resources=resources,
            notifications=store.notifications,
            budgets=budgets,
            upkeep_engine=store.upkeep_engine,
            certificates=certificates,
            reloader=reloader,
            budget_watch=budget_watch,
            webhooks=webhooks,
        )
        resources.push_async_callback(app._cancel_background)
        return app

    async def _start_up(self) -> None:
        """Readiness checks (and the SQLite migration), then the periodic upkeep: lease
        renewal and crash recovery, and readiness re-checks of the database."""
        cli_path = self.settings.cli_path or BUNDLED_CLI
        await self._sweep_host()  # before readiness: a restart's own leftovers too
        assert self.upkeep_engine is not None
        if self.notifications is not None:
            # Cancels, events and budget changes of the other replicas, as they commit.
            self._background.append(
                asyncio.create_task(self.notifications.run(), name="notifications")
            )
        await self.health.check(
            self.engine,
            self.upkeep_engine,
            cli_path,
            migrate_first=self.settings.migrate_at_start,
        )
        if self.notifications is not None:
            # Its first verdict (a refused connection comes at once, an unheard NOTIFY
            # after SELF_CHECK_S); readiness follows it later as it changes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.notifications.tried.wait(), SELF_CHECK_S + 20)
        await self.health.started()
        if self.sessions.pool is not None:
            self.sessions.pool.start()  # once ready: a server that cannot serve spends nothing
        if self.budget_watch is not None:
            await self.budget_watch.refresh()  # the budget gauges have values once ready
            self._background.append(
                asyncio.create_task(self.budget_watch.run(), name="budget-gauges")
            )
        if self.reloader is not None:
            self._background.append(
                asyncio.create_task(
                    self.reloader.watch(self.settings.tenants_poll_s), name="tenants-file"
                )
            )
        sqlite = self.engine.dialect.name == "sqlite"
        checks = [
            PoolCheck(WRITES, self.upkeep_engine),
            # On PostgreSQL the callers' pool is checked only while a request found it
            # failing: checking it always would keep a connection of it open for good.
            PoolCheck(DATABASE, self.engine, always=sqlite),
        ]
        self._background += [
            asyncio.create_task(self.sessions.lease_keeper.run(), name="leases"),
            *(
                [asyncio.create_task(self.webhooks.run(), name="webhooks")]
                if self.webhooks is not None
                else []
            ),
            asyncio.create_task(
                self.health.monitor(checks, self.settings.health_interval_s), name="health"
            ),
            *(
                asyncio.create_task(
                    close_idle_connections(e, self.settings.db_idle_timeout_s), name="idle"
                )
                for e in (self.engine, self.upkeep_engine)
                if not sqlite
            ),
            asyncio.create_task(
                self.sessions.deleter.run(
                    lambda: self.tenants.tenants.values(),
                    self.settings.retention_interval_s,
                ),
                name="retention",
            ),
        ]

    async def _sweep_host(self) -> None:
        """Remove what dead servers of this host left in their work dirs (this one's too:
        it may be a restart), whatever work dirs they had."""
        folders = self.sessions.folders
        host_dir = self.settings.host_dir or default_host_dir()
        work_dirs = await asyncio.to_thread(register, host_dir, self.settings.work_dir.resolve())
        for work_dir in work_dirs:
            removed = await folders.sweep(work_dir)
            if removed:
                log.info("host_swept", extra={"work_dir": str(work_dir), "folders": removed})

    async def _cancel_background(self) -> None:
        tasks = [t for t in [self._ready_task, *self._background] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sessions.queries.feeds.close()

    async def reload_tenants(self, trigger: str = "SIGHUP") -> TenantChanges | None:
        """Re-read the tenants file now (SIGHUP); what changed, None if it is invalid (or
        there is none: dev mode)."""
        if self.reloader is None:
            log.warning(
                "tenants_reload_skipped", extra={"detail": "no AGENTPLANE_TENANTS_FILE (dev mode)"}
            )
            return None
        return await self.reloader.reload(trigger)

    async def ready(self) -> None:
        """Wait for the start-up checks to finish (whatever their verdict)."""
        if self._ready_task is not None:
            await self._ready_task

    async def stop(self, grace: float | None = None, force: asyncio.Event | None = None) -> None:
        """Drain: readiness NOT_SERVING at once (liveness stays SERVING), new sessions
        UNAVAILABLE, running ones get `grace` seconds (default AGENTPLANE_SHUTDOWN_GRACE_S,
        cut short when `force` is set), the rest end ERROR/SHUTDOWN, settled; then close
        everything `start` opened, in reverse order."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        log.info(
            "shutdown",
            extra={
                "phase": "draining",
                "live_sessions": self.sessions.live_count,
                "grace_s": grace,
            },
        )
        await self.health.drain()
        if self.sessions.pool is not None:
            await self.sessions.pool.close()
        await self.sessions.drain(grace, force)
        await self._resources.aclose()
        log.info("shutdown", extra={"phase": "done"})


def _open_work_dir(work_dir: Path, tenants: TenantRegistry) -> None:
    """Agents running as tenants' own users must traverse (not list) the work dir."""
    if any(t.os_user for t in tenants.tenants.values()):
        work_dir.chmod(0o711)


@dataclass(frozen=True)
class _Store:
    """The database as the server opened it: the callers' engine and the running
    sessions' (upkeep) one, their sessionmakers, and what commits notify."""

    engine: AsyncEngine
    upkeep_engine: AsyncEngine
    db: async_sessionmaker[DbSession]
    upkeep_db: async_sessionmaker[DbSession]
    bus: Bus
    # PostgreSQL: the LISTEN for what other replicas tell this one (None on SQLite).
    notifications: Listener | None


def _open_store(resources: contextlib.AsyncExitStack, settings: Settings, health: Health) -> _Store:
    callers_pool, writes_pool = pool_sizes(settings)
    engine = _engine(settings, "main", callers_pool)
    resources.push_async_callback(engine.dispose)
    # Running sessions write through a pool of their own (see SessionParts).
    upkeep_engine = _engine(settings, "write", writes_pool)
    resources.push_async_callback(upkeep_engine.dispose)
    on_connection_failure(engine, lambda error: health.pool_failed(DATABASE, engine, error))
    on_connection_failure(
        upkeep_engine, lambda error: health.pool_failed(WRITES, upkeep_engine, error)
    )
    # What this server's commits and (PostgreSQL) the other replicas' notify.
    bus = Bus()
    notifications = None
    if engine.dialect.name == "postgresql":
        # Straight to PostgreSQL (a pooler's server connection would not stay ours),
        # proven by a NOTIFY through the sessions' pool, which readiness keeps warm.
        listen_setting = LISTEN_SETTING if settings.pooled else SETTING
        notifications = Listener(
            settings.direct_url,
            bus,
            notify_through=upkeep_engine,
            status=health.listen,
            describe=lambda error: explain(error, settings.direct_url, listen_setting),
        )
    return _Store(
        engine,
        upkeep_engine,
        sessionmaker(engine, bus),
        sessionmaker(upkeep_engine, bus),
        bus,
        notifications,
    )


async def _open_gateway(
    resources: contextlib.AsyncExitStack, settings: Settings, health: Health, telemetry: Telemetry
) -> MeteringGateway:
    # Per server (pid): replicas may share a work dir.
    socket = settings.work_dir / f".gateway-{os.getpid()}.sock"
    gateway = MeteringGateway(
        price_table(settings),
        unix_socket=socket if settings.sandbox else None,
        max_body_bytes=settings.gateway_max_body_mib * 1024 * 1024,
    )
    await gateway.start()
    resources.push_async_callback(gateway.stop)
    gateway.on_upstream = health.model_api
    gateway.keep_content = telemetry.content.capture  # for the chat spans' messages
    return gateway


async def _open_sandboxes(
    resources: contextlib.AsyncExitStack, settings: Settings, gateway: MeteringGateway
) -> Sandboxes | None:
    """The sessions' sandboxes (None: AGENTPLANE_SANDBOX=none)."""
    if not settings.sandbox:
        return None
    sandboxes = await _sandboxes(settings, settings.cli_path or BUNDLED_CLI, gateway)
    resources.callback(sandboxes.close)
    return sandboxes


def sessions_config(settings: Settings, tenants: TenantRegistry, owner: str) -> SessionsConfig:
    """The sessions room's configuration, as the settings say."""
    return SessionsConfig(
        launch=LaunchConfig(
            work_dir=settings.work_dir,
            base_url=settings.anthropic_base_url,
            cli_path=settings.cli_path or BUNDLED_CLI,
            cli_max_retries=settings.cli_max_retries,
            scrub_env=frozenset(tenants.key_env_names()),
        ),
        runner=RunnerConfig(
            idle_timeout_s=settings.session_idle_timeout_s,
            retry=RetryPolicy(
                attempts=settings.retry_attempts, base_delay_s=settings.retry_base_delay_s
            ),
        ),
        pool=PoolConfig(
            max_age_s=settings.warm_pool_max_age_s,
            min_available_mib=settings.warm_pool_min_available_mib,
        ),
        leases=LeaseConfig(owner=owner, ttl_s=settings.lease_ttl_s),
    )


def _bind(
    server: grpc.aio.Server, settings: Settings, certificates: CertificateFiles | None
) -> int:
    """Bind the gRPC port (TLS when `certificates`); ConfigError where it cannot."""
    try:
        if certificates is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, certificates.credentials())
    except RuntimeError:  # grpcio raises where older releases returned 0
        port = 0
    if port == 0:
        raise ConfigError(
            "AGENTPLANE_LISTEN",
            (
                f"cannot bind {settings.listen}: the port is in use (another agentplane "
                "server?), or the host is not an address of this machine"
            ),
        )
    return port


def _follow_tenants(
    settings: Settings,
    sessions: SessionManager,
    metrics: tuple[TelemetryObserver, BudgetWatch],
) -> Callable[[TenantRegistry, TenantChanges], None]:
    """What follows a reloaded tenants file, once it is in force."""

    def follow(registry: TenantRegistry, changes: TenantChanges) -> None:
        observer, budget_watch = metrics
        observer.declare_tenants(changes.added)
        budget_watch.changed()  # the budgets of added tenants, the new limits
        if changes.removed:
            stopped = sessions.tenants_removed(set(changes.removed))
            if stopped:
                log.info(
                    "tenant_sessions_cancelled",
                    extra={"tenants": list(changes.removed), "sessions": stopped},
                )
        raised = {
            name: registry.tenants[name]
            for name, names in changes.changed.items()
            if "daily_limit_usd" in names
        }
        if raised:
            sessions.limits_raised(raised)
        if sessions.pool is not None:
            sessions.pool.update(registry.tenants.values())
        sessions.launcher.scrub_also(registry.key_env_names())
        _open_work_dir(settings.work_dir, registry)

    return follow


def _grpc_server(
    telemetry: Telemetry,
    tenants: TenantRegistry,
    sessions: SessionManager,
    db: async_sessionmaker[DbSession],
    budgets: BudgetReader,
    health: Health,
) -> grpc.aio.Server:
    """The gRPC server with agentplane's services, health and reflection (not bound)."""
    # No SO_REUSEPORT: a second server on a port in use must fail, not split its calls.
    server = grpc.aio.server(
        interceptors=[DecodeGuard(), *telemetry.server_interceptors()],
        options=[
            ("grpc.so_reuseport", 0),
            # A RunSession carries its input files (tenants' totals are capped below this).
            ("grpc.max_receive_message_length", MAX_INPUT_TOTAL_BYTES + (1 << 20)),
        ],
    )
    session_pb2_grpc.add_SessionServiceServicer_to_server(
        SessionService(tenants, sessions, CallSpans(telemetry.content)), server
    )
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(BudgetService(tenants, budgets), server)
    usage_pb2_grpc.add_UsageServiceServicer_to_server(
        UsageService(tenants, UsageReader(db)), server
    )
    webhook_pb2_grpc.add_WebhookServiceServicer_to_server(
        WebhookService(tenants, DeliveryReader(db)), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
            usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
            webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server


async def _when_ready(app: App, on_ready: Callable[[App], None]) -> None:
    await app.health.became_ready.wait()
    on_ready(app)


async def serve(
    settings: Settings,
    tenants: TenantRegistry | None = None,
    on_ready: Callable[[App], None] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain and stop; a second signal cuts the grace
    period short. `on_ready` is called once, when readiness is first SERVING. Returns the
    exit code."""
    app = await App.start(settings, tenants)
    announce = None if on_ready is None else asyncio.create_task(_when_ready(app, on_ready))
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    reloads: set[asyncio.Task[object]] = set()

    def on_hangup() -> None:
        task: asyncio.Task[object] = asyncio.create_task(app.reload_tenants("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()
    if announce is not None:
        announce.cancel()
    await app.stop(force=force)
    return 0
