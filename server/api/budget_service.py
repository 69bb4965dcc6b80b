"""agentplane.v1.BudgetService and UsageService."""

from __future__ import annotations

import re
from datetime import date

import grpc
from agentplane.v1 import budget_pb2, budget_pb2_grpc, usage_pb2, usage_pb2_grpc

from ..domain import utcnow
from ..errors import InvalidArgument, quote
from ..money.ledger import BudgetReader
from ..sessions.records.usage import UsageReader
from ..tenants import TenantRegistry
from . import convert
from .auth import caller
from .errors import unary


class BudgetService(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, tenants: TenantRegistry, budgets: BudgetReader) -> None:
        self._tenants = tenants
        self._budgets = budgets

    @unary
    async def GetBudget(
        self, request: budget_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.Budget:
        tenant = caller(self._tenants, context)
        if request.date:
            day = _day(request.date)
        else:
            day = self._budgets.today(tenant, utcnow())
        window = await self._budgets.window(tenant, day)
        return convert.budget_to_proto(
            window,
            max_session_budget=convert.money(tenant.max_session_budget_usd),
            max_turns=tenant.max_turns,
            max_concurrent=tenant.max_concurrent_sessions,
        )


# The days whose window (midnight to midnight in any time zone) datetime can hold.
_FIRST_DAY, _LAST_DAY = date(1, 1, 2), date(9999, 12, 30)


def _day(raw: str) -> date:
    # Exactly YYYY-MM-DD: date.fromisoformat alone also takes 20261201 and 2026-W01-1.
    try:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw, re.ASCII):
            raise ValueError(raw)
        day = date.fromisoformat(raw)
    except ValueError:
        raise InvalidArgument("date", f"{quote(raw)} is not a date as YYYY-MM-DD") from None
    if not _FIRST_DAY <= day <= _LAST_DAY:
        raise InvalidArgument("date", f"must lie between {_FIRST_DAY} and {_LAST_DAY}")
    return day


class UsageService(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, tenants: TenantRegistry, usage: UsageReader) -> None:
        self._tenants = tenants
        self._usage = usage

    @unary
    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.Usage:
        tenant = caller(self._tenants, context)
        usage = await self._usage.usage(
            tenant,
            convert.from_timestamp(request, "start_time"),
            convert.from_timestamp(request, "end_time"),
        )
        return convert.usage_to_proto(usage)
