"""Tenants' MCP servers: their declarations (`servers.py`) and what a session's CLI is given
(`cli_config.py`), where the gateway relays the remote ones (`gateway/mcp_relay.py`)."""
