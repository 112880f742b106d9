"""The one migration core: the handover every backend shares.

`phases` holds every rule of the handover's state in one table; `source`
and `destination` are the two coordinators that drive it over the control
channel; `drivers` says what a backend must supply; `recovery` settles what
a crash or a cut link left undecided. Nothing here knows a backend.
"""
