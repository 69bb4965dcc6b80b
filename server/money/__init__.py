"""Money: the versioned price table, day windows in a tenant's time zone, the budget ledger
(reserve at admission, settle at the end) and the check of a session's metered cost against
the CLI's own count. The gateway meters each request with it (`gateway/`); the rows are
`store/ledger.py` and `store/model_requests.py`."""
