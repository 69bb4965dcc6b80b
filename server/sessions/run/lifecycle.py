"""A session's life after admission: IDLE -> RUNNING, the agent's run, and the end.

The end is recorded once (`ending.write_end`) after every earlier event is written;
while the database is down that is retried, and past `finish_retry_s` the session is
left to crash recovery.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import DBAPIError

from ...domain import Artifact, ErrorReason, Event, EventKind, Session, SessionState, usd, utcnow
from ...errors import DatabaseUnavailable
from ...gateway.meter import MeteredRequest
from ...money.shortfall import session_shortfall
from ...store import artifacts
from ...store import sessions as repo
from ...tenants import Tenant
from ..agents.pool import WarmAgent, WarmPool
from ..caller_loop.inputs import InputHub
from ..live import LiveSession
from ..parts import SessionParts
from ..pauses import BudgetHub, SessionBudget
from ..run_request import SessionSpec
from .ending import result_event, write_end
from .metering import RequestRecorder
from .outcome import Outcome
from .runner import AgentRunner
from .translate import Verdict

log = logging.getLogger(__name__)


class SessionLifecycle:
    """Runs admitted sessions to their end and records it."""

    def __init__(
        self,
        parts: SessionParts,
        runner: AgentRunner,
        pool: WarmPool | None = None,
        *,
        finish_retry_s: float = 60.0,
        budgets: BudgetHub | None = None,
    ) -> None:
        # A running session writes, and waits for its caller's answers, through the
        # running sessions' own pool.
        self._db = parts.upkeep_db
        self._webhooks = parts.webhooks
        self._budgets = budgets or BudgetHub(parts.upkeep_db, parts.webhooks)
        self._runner = runner
        self._capacity = parts.capacity
        self._queries = parts.queries
        self._observer = parts.observer
        self._pool = pool
        self._inputs = InputHub(parts.upkeep_db, parts.webhooks)
        self._finish_retry_s = finish_retry_s

    def launch(
        self,
        live: LiveSession,
        spec: SessionSpec,
        tenant: Tenant,
        warm: WarmAgent | None,
    ) -> None:
        """Start the admitted session's run task, in the context the observer gives (its
        trace span current)."""
        session = live.session
        context = self._observer.admitted(session, spec.prompt)
        context.run(
            log.info,
            "session_start",
            extra={
                "session_id": session.id,
                "tenant": tenant.name,
                "model": session.model,
                "max_budget_usd": str(session.max_budget_usd),
                "max_turns": session.max_turns,
            },
        )
        # From admission on, raises of its budget (UpdateSessionBudget) reach the session.
        budget = self._budgets.session(live, spec.max_pause_s)
        live.task = asyncio.create_task(
            self._run(live, spec, tenant, warm, budget), name=f"session-{live.id}", context=context
        )
        live.task.add_done_callback(lambda _: budget.close())

    async def _run(
        self,
        live: LiveSession,
        spec: SessionSpec,
        tenant: Tenant,
        warm: WarmAgent | None,
        budget: SessionBudget,
    ) -> None:
        try:
            if live.cancel_requested.is_set():  # cancelled while IDLE: never start
                await self._discard(warm)
                outcome = Outcome(
                    Verdict(SessionState.ERROR, live.cancel_reason, live.cancel_message)
                )
            else:
                running = live.session.evolve(state=SessionState.RUNNING, start_time=utcnow())
                async with self._db.begin() as db:
                    await repo.save_progress(db, running, expect=SessionState.IDLE)
                live.session = running
                live.emit(
                    EventKind.STATE_CHANGE,
                    {"from_state": SessionState.IDLE.value, "to_state": SessionState.RUNNING.value},
                )
                recorder = RequestRecorder(self._db, live)

                def settled(request: MeteredRequest) -> None:
                    recorder.add(request)
                    self._observer.model_request(live.session, request)

                waiter = (
                    self._inputs.waiter(live, spec.answer_timeout_s) if spec.in_the_loop else None
                )
                outcome = await self._runner.run(live, spec, tenant, warm, settled, waiter, budget)
                await recorder.close()
        except asyncio.CancelledError:
            # Cancelled from outside (event loop shutdown): still record the end.
            live.request_cancel(ErrorReason.SHUTDOWN)
            await asyncio.shield(self._discard(warm))  # harmless if the runner closed it
            verdict = Verdict(SessionState.ERROR, live.cancel_reason, live.cancel_message)
            await asyncio.shield(self._finish(live, Outcome(verdict)))
            raise
        except DatabaseUnavailable as exc:  # the database went away before the agent started
            outcome = Outcome(
                Verdict(SessionState.ERROR, ErrorReason.DATABASE_UNAVAILABLE, str(exc))
            )
        except Exception as exc:  # a bug of ours must still end the session and settle
            log.exception("session %s failed", live.id)
            outcome = Outcome(
                Verdict(SessionState.ERROR, ErrorReason.AGENT_FAILED, f"internal error: {exc}")
            )
        await self._finish(live, outcome)

    async def _discard(self, warm: WarmAgent | None) -> None:
        if warm is not None and self._pool is not None:
            await self._pool.discard(warm)

    async def _finish(self, live: LiveSession, outcome: Outcome) -> None:
        """Record the end, then publish the result and leave the registry."""
        v = outcome.verdict
        sdk_cost = outcome.sdk_total_usd if outcome.sdk_total_usd is not None else outcome.cost_usd
        final = live.session.evolve(
            state=v.state,
            end_time=utcnow(),
            error_reason=v.reason,
            error_message=v.message,
            cost_usd=usd(outcome.cost_usd),
            sdk_cost_usd=usd(sdk_cost),
            shortfall_usd=session_shortfall(usd(sdk_cost), usd(outcome.cost_usd)),
            num_turns=outcome.num_turns,
            usage=outcome.usage,
            sdk_session_id=outcome.sdk_session_id,
            result=outcome.result if v.state is SessionState.COMPLETE else "",
            structured_result=outcome.structured if v.state is SessionState.COMPLETE else None,
        )
        self._report_shortfalls(final, outcome)
        live.seal()
        seq = live.next_seq
        recorded = await self._record_end(live, final, seq, outcome.artifacts)
        if recorded is not None:  # as recorded: a raise of its budget may have come meanwhile
            final = Session.from_json(recorded.data["session"])
        live.session = final
        if recorded is not None:  # else the database holds another end: `get` reads it there
            self._queries.remember(final)
        live.publish(recorded or result_event(final, seq), persist=False)
        live.end()
        self._capacity.ended(live.id)
        log.info(
            "session_complete" if final.state is SessionState.COMPLETE else "session_error",
            extra={
                "session_id": final.id,
                "tenant": final.tenant,
                "reason": final.error_reason.value if final.error_reason else None,
                "detail": final.error_message[:500] or None,
                "cost_usd": str(final.cost_usd),
                "num_turns": final.num_turns,
            },
        )

    def _report_shortfalls(self, final: Session, outcome: Outcome) -> None:
        """Log and count each model whose metered cost fell short of the CLI's count."""
        for short in outcome.shortfalls:
            log.warning(
                "metering_shortfall",
                extra={
                    "session_id": final.id,
                    "tenant": final.tenant,
                    "model": short.model,
                    "cli_cost_usd": str(short.cli_usd),
                    "metered_cost_usd": str(short.metered_usd),
                    "shortfall_usd": str(short.gap_usd),
                    "price_table_hint": "the price table lacks a price the CLI knows",
                },
            )
            self._observer.shortfall(final, short.model, short.gap_usd)

    async def _record_end(
        self, live: LiveSession, final: Session, seq: int, kept: list[Artifact]
    ) -> Event | None:
        """Write the remaining events, then the end (`write_end`). While the database is
        down this is retried for `finish_retry_s`; after that the session is left to crash
        recovery (its lease is no longer renewed once it leaves the registry). The
        workspace's artifacts (`kept`) are written with the end. Returns the recorded
        result event, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._finish_retry_s
        delay = 0.2
        while True:
            remaining = deadline - loop.time()
            try:
                if not await live.writer.close(timeout=max(remaining, 0.0)):
                    raise TimeoutError("events still unwritten")
                async with self._db.begin() as db:
                    result = await write_end(
                        db, final, expect=live.session.state, seq=seq, webhooks=self._webhooks
                    )
                    if result is not None:  # with the end, or not at all
                        await artifacts.insert_artifacts(db, final.id, kept)
                if result is None:
                    log.warning("session %s was closed by another server meanwhile", final.id)
                return result
            except (DBAPIError, DatabaseUnavailable, TimeoutError) as exc:
                if loop.time() + delay > deadline:
                    live.writer.abort()
                    log.error(
                        "recording the end of session %s failed for good (%s); crash "
                        "recovery will close it",
                        final.id,
                        type(exc).__name__,
                    )
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
