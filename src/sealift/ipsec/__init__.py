"""IPsec transport: strongSwan charon per host, one IKEv2/ESP SA per migration, keyed by a per-migration PSK.

    charon.py       run charon (kernel ESP or libipsec), one per host / namespace
    vici_client.py  VICI messages (pure) and a thin client
    tunnel.py       IpsecEndpoint (one host's end), IpsecTunnel (both ends on namespaces), static-PSK baseline
    sa_key.py       the per-migration IKE PSK (the SA's key) from the TLS exporter and the pair's dynamic PSK

The testbed for this transport and the attacker's tools against it are in sealift.lab.ipsec.
"""
