"""Tenants' MCP servers: their declarations (`servers.py`) and the gateway's relay to the
remote ones (`relay.py`)."""
