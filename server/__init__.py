"""agentplane server."""
