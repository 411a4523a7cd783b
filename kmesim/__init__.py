"""fleetbus.kmesim: an ETSI GS QKD 014 key server (KME) simulator and its throw-away test PKI.

A server, not a key provider: the ``qkd-etsi014`` provider (``fleetbus.providers.qkd``) is its
client. The demo, the compose stack and the tests run it; a real deployment points the provider
at real KMEs instead.
"""
