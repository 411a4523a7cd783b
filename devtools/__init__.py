"""fleetbus.devtools: local developer tooling. Production code never imports it.

Modules: ``kafka`` (a provisioned Apache Kafka: ``LocalKafka``, ports, mTLS PKI, ACLs), ``kme``
(a KME pair in a child process), ``pki`` (certificate helpers), ``fleet`` (the test fleet on
disk and its settings, shared by the tests and the benchmarks), ``process`` (the one child-process
wrapper: ``ChildProcess``, ``WorkerProcess``, ``spawn``, ``stop_group``) and ``demo`` (the
``fleetbus demo`` scenario, runner and report).
"""
