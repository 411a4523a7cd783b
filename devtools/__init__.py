"""fleetbus.devtools: local developer tooling — a provisioned Apache Kafka, a KME pair in a
child process, the test PKI, the demo and the smoke agent. Production code never imports it."""
