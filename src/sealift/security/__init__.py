"""Security layer: cluster CA and host identities, mutual TLS 1.3, session keys,
signed documents. Import from the submodules (identity, tls, keys, signing, errors)."""
