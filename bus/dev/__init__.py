"""Developer tooling: a locally provisioned Apache Kafka for the demo and the tests."""
