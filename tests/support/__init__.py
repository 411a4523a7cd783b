"""Helpers shared by the test suites, imported as ``tests.support.<module>`` (the repository root
is on ``sys.path``: ``pythonpath = ["."]`` in pyproject.toml; scripts insert it themselves).

- ``envelope``: in-memory fleets (``issuer`` + ``fleet_of``), directories and worlds for the
  envelope and stage unit tests.
- ``pipeline``: a complete test fleet on disk, topic settings and a worker's environment for
  tests against a real broker (the fleet itself is ``fleetbus.devtools.fleet``, shared with
  bench/).
- ``containers``: the Docker engine, the image and the testcontainers Kafka.
- ``fixtures_kme``: the pytest plugin with the real KME pair (loaded by ``tests/conftest.py``).
- ``sides``: ``ProviderSides``, what the key-provider contract suite runs against.
- ``fault_rig``: the three-broker fault rig of ``integration/test_faults.py`` and ``soak/``.
- ``doc_blocks``: the fenced code blocks of README.md and docs/*.md and their marks.
- ``deploy``: docker-compose.yml and the CLI as the deployment tests read them.

``tests/`` and each suite are packages, so a test module is ``tests.unit.test_x`` and nothing in
``tests/`` is a top-level import.
"""
