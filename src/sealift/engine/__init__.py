"""The pre-copy multi-pass migration engine (Clark et al. 2005)."""
