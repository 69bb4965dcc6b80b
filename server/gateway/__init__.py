"""The metering gateway: the loopback proxy every agent CLI reaches the model through, which
meters and caps each request against its session's budget, and relays its remote MCP servers."""
