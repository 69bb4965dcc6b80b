"""Sessions as records: GetSession, StreamSession (replayed, then followed), ListSessions and
its page tokens, GetUsage, DeleteSession and each tenant's retention."""
