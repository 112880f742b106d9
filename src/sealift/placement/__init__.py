"""Placement: which host should take a VM, from signed resource adverts.

`adverts` is sans-IO (make, sign, verify and rank adverts); `placer` asks
the peers for them over the control channel.
"""
