"""The sandbox: where each session's agent CLI runs on the host, sealed from the others.

Bubblewrap namespaces, a seccomp filter, cgroup limits, a uid of its own and a
size-limited folder per session; the session's folders, their owners and the sweep of dead
servers' ones; the CLI's environment; killing every process of a session.

Knows nothing of gRPC, the database, the SDK or the sessions that use it.
"""
