"""The lab's T13 "old captures, keys stolen later" and T7 for QEMU guests, on real agents, as root.

T13 (built-in backend): the baseline (a plaintext migration inside a TLS 1.2
tunnel with RSA key transport) must be decrypted by tshark with the tunnel's
stolen RSA key, secret found; then two sealift sessions, captured the same
way, must yield nothing to tshark given both hosts' stolen keys, while the
thief also holds the pair's unwrapped PSK.

T7 (QEMU backend): placement sizes the QEMU guest from the QEMU registry,
and a host lying in its adverts is caught at admission and down-ranked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.backends.qemu.host import QEMU_BINARY
from sealift.lab.attacks.base import AttackResult
from sealift.lab.runner import LabRun

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)")

OLD_CAPTURES = "read old captures with keys stolen later"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with LabRun(out_dir=tmp_path_factory.mktemp("lab-keys-placement")) as run:
        yield run


def check(result: AttackResult) -> None:
    assert not result.evidence.startswith("error:"), result.evidence
    assert result.sealift == "blocked", result.evidence
    assert result.vm_running_copies == 1, result.evidence


@pytest.mark.timeout(150)
def test_t13_a_stolen_rsa_key_decrypts_the_baseline_but_stolen_host_keys_and_psks_decrypt_nothing(lab: LabRun) -> None:
    results = lab.run(only={"T13"}, backends=("builtin",))
    for result in results:
        check(result)
    (old,) = [r for r in results if r.attack == OLD_CAPTURES]
    d = old.details
    # The baseline: a session without forward secrecy, decrypted later with the server's stolen RSA key.
    assert old.baseline == "succeeded", old.evidence
    assert d["baseline_sessions"] == ["TLSv1.2 AES128-GCM-SHA256"]
    assert d["baseline_secret_in_raw_capture"] is False  # the tunnel did encrypt it...
    assert d["baseline_secret_found"] is True and d["baseline_decrypted_bytes"] > 1 << 20  # ...until the key leaked
    # sealift: both host keys and both PSK databases stolen; tshark decrypts nothing.
    assert [Path(k).name for k in d["stolen_keys"]] == ["host-a.key", "host-b.key"]
    assert all(Path(k).exists() for k in d["stolen_keys"])
    psks = d["stolen_psks"]
    assert psks["host-a"]["fingerprint"] == psks["host-b"]["fingerprint"]  # the pair's current PSK, unwrapped
    assert all(p["matches_agent"] and p["epoch"] >= 1 for p in psks.values())
    assert all(n >= 2 for n in d["sealift_streams"])  # control and data connections of each session were followed
    assert d["sealift_decrypted_bytes"] == 0 and d["sealift_secret_found"] is False
    assert any("host-a.key" in e for e in d["tshark_key_errors"])
    shares = [share for session in d["key_shares"] for share in session]
    assert len(shares) >= 2 and len(set(shares)) == len(shares)


@pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed")
@pytest.mark.timeout(150)
def test_t7_a_lying_host_does_not_attract_a_qemu_guest(lab: LabRun) -> None:
    impossible, plausible = lab.run(only={"T7"}, backends=("qemu",))
    for result in (impossible, plausible):
        check(result)
        assert result.backend == "qemu"
    assert impossible.baseline == "succeeded" and impossible.details["baseline_choice"] == "host-c"
    assert impossible.details["placement"]["host"] == "host-b"
    assert plausible.details["first_placement"]["host"] == "host-c"  # the lie wins on paper...
    assert "needs 128 MiB" in plausible.details["error"]  # ...the QEMU guest's size is caught at admission...
    assert plausible.details["second_placement"]["host"] == "host-b"  # ...and the liar is down-ranked
    assert plausible.details["copies"] == {"host-a": "running"}
