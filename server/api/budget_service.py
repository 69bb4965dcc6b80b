"""agentplane.v1.BudgetService and UsageService."""

from __future__ import annotations

from datetime import date

import grpc
from agentplane.v1 import budget_pb2, budget_pb2_grpc, usage_pb2, usage_pb2_grpc

from ..budgets.ledger import BudgetReader
from ..domain import utcnow
from ..errors import InvalidArgument
from ..sessions.usage import UsageReader
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
            try:
                day = date.fromisoformat(request.date)
            except ValueError:
                raise InvalidArgument("date", f"{request.date!r} is not YYYY-MM-DD") from None
        else:
            day = self._budgets.today(tenant, utcnow())
        window = await self._budgets.window(tenant, day)
        return convert.budget_to_proto(
            window,
            max_session_budget=str(tenant.max_session_budget_usd),
            max_turns=tenant.max_turns,
            max_concurrent=tenant.max_concurrent_sessions,
        )


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
