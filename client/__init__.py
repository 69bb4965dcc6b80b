"""agentplane: client for the agentplane control plane."""
