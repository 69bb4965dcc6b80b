"""Agents: launching an agent CLI for a tenant (in its sandbox, metered by the gateway, with
its SDK options), and the warm pool of agents started ahead of demand."""
