"""The IPsec transport's testbed and the attacker's tools against it (never used by an agent).

routed_pair.py      a small namespace testbed (two hosts, a router) and tshark captures
secret_transfer.py  a bounded TCP transfer holding a secret line, for tests and the benchmark
replay_attack.py    the attacker: record IKE packets from a capture and replay them, spoofed
intruder.py         the attacker: a VICI tap, an address claim, a charon of its own
"""
