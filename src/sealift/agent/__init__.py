"""The per-host daemon: owns VMs, serves the migration port and the control socket."""
