"""OpenTelemetry traces and metrics, JSON logs: setup, names and the session observer."""
