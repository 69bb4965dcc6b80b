"""A session's run after admission: IDLE -> RUNNING, the agent's attempts and retries, the
message pump (SDK messages -> events), the limits watch, the metered requests, and the end
written in one transaction."""
