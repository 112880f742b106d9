"""Security and reliability monitors (seed 004, threat T12).

Per-VM monitors (VSEM/VREM) observe each VM from outside: CPU of its
process, memory dirty rate, network traffic, progress and status. The host
monitor (HSEM/HREM) learns each VM's normal behaviour and classifies what
departs from it: *attacker* (self-driven load: outbound traffic or a memory
write storm, with CPU), *victim* (inbound load without matching outbound),
and reliability problems (stalls, errors, restarts). The migration-port
watch (an IDS) counts hostile behaviour per peer and blocks peers for a while.

Layout: a sans-IO core (`signals`, `baseline`, `classify`, `reliability`,
`portwatch`, `gate`) and I/O at the edges (`collectors`, `service`).
"""
