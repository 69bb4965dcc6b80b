"""The budget ledger: daily windows, reservations and settlement."""
