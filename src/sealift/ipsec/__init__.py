"""IPsec transport: strongSwan charon per host, one IKEv2/ESP SA per migration, keyed by a per-migration PSK.

    charon.py       run charon (kernel ESP or libipsec), one per host / namespace
    vici_client.py  VICI messages (pure) and a thin client
    tunnel.py       IpsecEndpoint (one host's end), IpsecTunnel (both ends on namespaces), static-PSK baseline
    psk.py          the per-migration IKE PSK from the TLS exporter and the pair's dynamic PSK
    netlab.py       a small namespace testbed (two hosts, a router) and tshark captures
    transfer.py     a bounded TCP transfer holding a secret line, for tests and the benchmark
    replay.py       the lab's attacker: record IKE packets from a capture and replay them, spoofed
    intruder.py     the lab's attacker: a VICI tap, an address claim, a charon of its own
"""
