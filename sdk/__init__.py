"""fleetbus.sdk: the client libraries — the dispatch SDK (publish commands, follow their
outcomes) and the vehicle agent (verify, open, execute, answer)."""
