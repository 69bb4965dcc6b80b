"""The baseline of benchmark 5: a bare grpc.aio server, run as a process of its own, answering
SessionService.GetSession/ListSessions and BudgetService.GetBudget with canned messages
from memory (no auth, no database, no interceptors).

    python tests/bench/bare_server.py PORT CANNED.json

CANNED: {"GetSession": "<hex of a Session>", "ListSessions": "<hex>", "GetBudget": "<hex>"},
the very messages agentplane answered the same requests with.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
from agentplane.v1 import budget_pb2, budget_pb2_grpc, session_pb2, session_pb2_grpc


class Sessions(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, canned: dict[str, str]) -> None:
        self.session = session_pb2.Session.FromString(bytes.fromhex(canned["GetSession"]))
        self.page = session_pb2.ListSessionsResponse.FromString(
            bytes.fromhex(canned.get("ListSessions", ""))
        )

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return self.session

    async def ListSessions(self, request, context):  # type: ignore[no-untyped-def]
        return self.page


class Budgets(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, canned: dict[str, str]) -> None:
        self.budget = budget_pb2.Budget.FromString(bytes.fromhex(canned["GetBudget"]))

    async def GetBudget(self, request, context):  # type: ignore[no-untyped-def]
        return self.budget


async def main(port: int, canned: dict[str, str]) -> None:
    server = grpc.aio.server()
    session_pb2_grpc.add_SessionServiceServicer_to_server(Sessions(canned), server)
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(Budgets(canned), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())))
