"""Per-session sandboxes: bubblewrap namespaces, cgroup limits, a size-limited folder.

Knows nothing of gRPC, the database or the SDK; `sessions/` uses it to start every agent
CLI sealed in its own sandbox.
"""
