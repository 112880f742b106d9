"""This host as every layer above sees it: its configuration (config), its durable state (store), and
the byte streams it speaks on (transport: TLS or plaintext control channels, data streams)."""
