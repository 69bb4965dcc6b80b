"""Generated gRPC stubs for agentplane.v1 (by `make proto`; never edit by hand)."""
