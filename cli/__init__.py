"""fleetbus.cli: the ``fleetbus`` command, one module per command group (``main`` wires them)."""
