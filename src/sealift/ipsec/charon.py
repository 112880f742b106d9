"""One strongSwan charon daemon per host, each inside the host's network namespace.

Several charons share one filesystem here (the "hosts" are network
namespaces), so each gets a private run directory holding its own
strongswan.conf (found through the STRONGSWAN_CONF environment variable),
VICI socket and log. charon's pid file is compiled in (/var/run/charon.pid),
so charon runs with a private /run: `ip netns exec` gives the child its own
mount namespace (slave to the host's), and a bind mount there is invisible
to everyone else.

The IPsec backend is the kernel's ESP (XFRM, plugin kernel-netlink) where
the kernel has it, and strongSwan's user-space ESP over a TUN device
(plugin kernel-libipsec) otherwise; `detect_backend` decides by trying to
install an AES-GCM ESP state in a scratch namespace.

No secret ever goes into the run directory: PSKs are loaded over VICI only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from types import TracebackType

from sealift.errors import SealiftError

CHARON_CANDIDATES = ("/usr/lib/ipsec/charon", "/usr/libexec/ipsec/charon", "/usr/lib/strongswan/charon")

# The routing table libipsec's routes into the TUN device go to (charon's
# default), and the priority of charon's own catch-all rule for it: after the
# main table (32766), so it never catches anything. tunnel.py adds a narrow
# rule per migration flow instead (TCP to/from the migration port only).
ROUTING_TABLE = 220
CATCH_ALL_RULE_PRIO = 40000

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class IpsecBackend(str, Enum):
    KERNEL = "kernel"  # the kernel's ESP (XFRM), via kernel-netlink
    LIBIPSEC = "libipsec"  # strongSwan's user-space ESP over TUN, via kernel-libipsec


class CharonError(SealiftError, RuntimeError):
    """charon could not be found, started, reached or stopped."""

    code = "charon_error"


def find_charon() -> Path:
    """The charon binary (Debian: /usr/lib/ipsec/charon from strongswan-charon)."""
    for candidate in (os.environ.get("SEALIFT_CHARON"), *CHARON_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise CharonError(
        "strongSwan's charon was not found (looked in " + ", ".join(CHARON_CANDIDATES) + "); "
        "install the Debian packages strongswan-charon, strongswan-swanctl and libcharon-extra-plugins"
    )


_backend_cache: IpsecBackend | None = None


def kernel_esp_available() -> bool:
    """Can this kernel do ESP with AES-GCM? Tried in a scratch namespace, so no host state is touched."""
    probe = f"slips-xfrm-probe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
    try:
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                probe,
                "ip",
                "xfrm",
                "state",
                "add",
                "src",
                "192.0.2.1",
                "dst",
                "192.0.2.2",
                "proto",
                "esp",
                "spi",
                "0x5ea1",
                "mode",
                "tunnel",
                "aead",
                "rfc4106(gcm(aes))",
                "0x" + "00" * 20,
                "128",
            ],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def detect_backend() -> IpsecBackend:
    """KERNEL where the kernel has ESP with AES-GCM, else LIBIPSEC (cached: modules do not come and go here)."""
    global _backend_cache
    if _backend_cache is None:
        forced = os.environ.get("SEALIFT_IPSEC_BACKEND")
        if forced:
            _backend_cache = IpsecBackend(forced)
        else:
            _backend_cache = IpsecBackend.KERNEL if kernel_esp_available() else IpsecBackend.LIBIPSEC
    return _backend_cache


# Plugins: crypto (openssl: AES-GCM, SHA-2, ECDH incl. X25519; kdf: IKEv2 prf+;
# nonce, random), the network layer (socket-default, kernel-netlink for
# addresses and routes), the IPsec backend and VICI. Nothing else: no stroke,
# no ipsec.secrets, no updown scripts. kernel-libipsec comes before
# kernel-netlink so that it registers first as the IPsec backend (charon uses
# the first kernel-ipsec interface; kernel-netlink still serves as kernel-net).
_COMMON_PLUGINS = ("random", "nonce", "openssl", "kdf")


def plugin_list(backend: IpsecBackend) -> list[str]:
    if backend is IpsecBackend.LIBIPSEC:
        return [*_COMMON_PLUGINS, "kernel-libipsec", "kernel-netlink", "socket-default", "vici"]
    return [*_COMMON_PLUGINS, "kernel-netlink", "socket-default", "vici"]


def render_strongswan_conf(
    run_dir: Path, backend: IpsecBackend, *, log_level: int = 1, subsystem_levels: Mapping[str, int] | None = None
) -> str:
    """The strongswan.conf of one charon (pure). It never holds a secret.

    Log levels above 2 would print key material (3: raw packets, 4: keys), so they are refused.
    """
    levels = {"default": log_level, **(subsystem_levels or {})}
    for subsystem, level in levels.items():
        if not re.fullmatch(r"[a-z]{3,7}", subsystem) or not -1 <= level <= 2:
            raise ValueError(f"log level {subsystem} = {level}: levels go from -1 to 2 (3 and 4 log secrets)")
    level_lines = "".join(f"            {subsystem} = {level}\n" for subsystem, level in levels.items())
    vici_socket = run_dir / "charon.vici"
    log_file = run_dir / "charon.log"
    libipsec = ""
    routing = ""
    if backend is IpsecBackend.LIBIPSEC:
        libipsec = "        kernel-libipsec {\n            allow_peer_ts = yes\n        }\n"
        # charon's catch-all rule "lookup <routing_table>" would send every
        # packet to the peer (IKE too) into the TUN device, where libipsec
        # drops what no policy covers. Put it behind the main table (never
        # reached for the peer) and let the tunnel add narrow rules for the
        # migration flow only (see tunnel.py).
        routing = f"    routing_table = {ROUTING_TABLE}\n    routing_table_prio = {CATCH_ALL_RULE_PRIO}\n"
    return (
        "# written by sealift for one charon (keys are loaded over VICI only)\n"
        "charon {\n"
        f"    load = {' '.join(plugin_list(backend))}\n"
        "    install_virtual_ip = no\n"
        f"{routing}"
        "    retransmit_tries = 3\n"
        "    retransmit_timeout = 1.0\n"
        "    retransmit_base = 1.4\n"
        "    filelog {\n"
        "        sealift {\n"
        f"            path = {log_file}\n"
        "            time_format = %H:%M:%S\n"
        "            ike_name = yes\n"
        "            append = yes\n"
        f"{level_lines}"
        "            flush_line = yes\n"
        "        }\n"
        "    }\n"
        "    syslog {\n"
        "        daemon {\n"
        "            default = -1\n"
        "        }\n"
        "    }\n"
        "    plugins {\n"
        "        vici {\n"
        f"            socket = unix://{vici_socket}\n"
        "        }\n"
        f"{libipsec}"
        "    }\n"
        "}\n"
    )


class Charon:
    """A running charon in network namespace `netns` (None: this one); stop() (or the context manager) always cleans up.

    run_dir: a private directory (created if None, removed on stop).
    """

    def __init__(
        self,
        netns: str | None,
        backend: IpsecBackend,
        run_dir: Path | None = None,
        *,
        log_level: int = 1,
        subsystem_levels: Mapping[str, int] | None = None,
    ) -> None:
        self.netns = netns
        self.backend = backend
        self._own_dir = run_dir is None
        self.run_dir = (
            Path(tempfile.mkdtemp(prefix=f"sealift-charon-{netns or 'host'}-")) if run_dir is None else run_dir
        )
        self.vici_socket = self.run_dir / "charon.vici"
        self.log_file = self.run_dir / "charon.log"
        self.conf_file = self.run_dir / "strongswan.conf"
        self._log_level = log_level
        self._subsystem_levels = dict(subsystem_levels or {})
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Charon:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _strongswan_conf(self) -> str:
        """The text start() writes to conf_file (a subclass may add to it)."""
        return render_strongswan_conf(
            self.run_dir, self.backend, log_level=self._log_level, subsystem_levels=self._subsystem_levels
        )

    def start(self) -> None:
        if self._process is not None:
            raise CharonError(f"charon in {self.netns} is already started")
        charon = find_charon()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_run = self.run_dir / "run"
        private_run.mkdir(mode=0o700, exist_ok=True)
        self.conf_file.write_text(self._strongswan_conf())
        self.vici_socket.unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "STRONGSWAN_CONF": str(self.conf_file)}
        # `ip netns exec` runs the child in a new mount namespace; the bind
        # mount gives charon its own /run (pid file) without touching the host's.
        script = 'mount --bind "$1" /run && exec "$2"'
        stderr = open(self.run_dir / "charon.stderr", "wb")
        try:
            # Without a netns (an agent on a real host), unshare gives the mount namespace instead.
            enter = (
                ["ip", "netns", "exec", self.netns] if self.netns else ["unshare", "--mount", "--propagation", "slave"]
            )
            self._process = subprocess.Popen(
                [*enter, "sh", "-c", script, "sh", str(private_run), str(charon)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        try:
            self._wait_for_vici()
        except BaseException:
            self.stop()
            raise

    def _wait_for_vici(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise CharonError(f"charon in {self.netns} exited with {self._process.returncode}: {self._tail()}")
            if self.vici_socket.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.vici_socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.05)
        raise CharonError(
            f"charon in {self.netns} did not open its VICI socket within {START_TIMEOUT_S:.0f} s: {self._tail()}"
        )

    def _tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.run_dir / "charon.stderr", self.log_file):
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        """SIGTERM (charon closes its SAs and TUN device), then SIGKILL after a grace period.

        Removes a private run directory.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class HostCharon:
    """The one charon of an agent's host: started on first use, shared by its migrations, stopped with the agent.

    One per host because charon owns the host's IKE ports (500, 4500) and,
    with libipsec, its TUN device; migrations are separate connections in it.
    """

    def __init__(self, run_dir: Path, netns: str | None = None, backend: IpsecBackend | None = None) -> None:
        self._run_dir = run_dir
        self._netns = netns
        self._backend = backend
        self._lock = threading.Lock()
        self._charon: Charon | None = None

    def get(self) -> Charon:
        """The running charon, started (and restarted, if it died) here."""
        with self._lock:
            if self._charon is not None and self._charon.running:
                return self._charon
            if self._charon is not None:
                self._charon.stop()
            charon = Charon(self._netns, self._backend or detect_backend(), run_dir=self._run_dir)
            charon.start()
            self._charon = charon
            return charon

    def stop(self) -> None:
        with self._lock:
            if self._charon is not None:
                self._charon.stop()
                self._charon = None
