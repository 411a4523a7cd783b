"""fleetbus.observability: metrics, tracing and logging set-up, dashboards and alert rules."""
