"""fleetbus.providers: key-provider and signer implementations, registered by entry point."""
