"""``tests/soak`` holds long runs (``python tests/soak/run_soak.py``) and the fault rig that
``tests/integration/test_faults.py`` imports; pytest collects nothing here."""

collect_ignore_glob = ["*"]
