"""``tests/soak`` holds long runs (``python tests/soak/run_soak.py``); the fault rig they share
with ``tests/integration/test_faults.py`` is ``tests/support/fault_rig.py``. pytest collects
nothing here."""

collect_ignore_glob = ["*"]
