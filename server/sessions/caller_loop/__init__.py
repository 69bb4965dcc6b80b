"""The caller in an agent's loop: the caller's tools, the hook on every tool call (approvals),
the questions put to it, and the waits for its answers (from any replica, with timeouts).

The approval rules themselves are `server/approvals.py`: the tenants file declares them too.
"""
