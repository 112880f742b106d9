"""One run of the attack lab: every registered attack, on each backend it supports.

`LabRun` is a `LabSession` (sealift.lab.session: the testbed, agents, guests
and tools every attack uses) with one more method, `run`. The attacks import
the session, never this module, so every import arrow points down:
runner -> attacks -> session.

    with LabRun(out_dir=Path("lab-results")) as lab:      # builds the testbed (root)
        results = lab.run(only={"T1"}, backends=("builtin",))

`run` calls every registered attack (sealift.lab.attacks) for each backend
it supports and returns the results. An attack that raises is never taken as
blocked: it becomes a result with sealift "succeeded", copies -1 and
"error: ..." as evidence (so the run fails), its traceback in
results_dir/T<n>-<backend>-error.txt.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable

import sealift.lab.attacks  # noqa: F401  (registers the attacks)
from sealift.lab.attacks.base import ATTACKS, AttackResult, RegisteredAttack
from sealift.lab.session import Backend, LabSession

__all__ = ["LabRun", "is_selected"]


class LabRun(LabSession):
    """A LabSession that runs the registered attacks (`run`) and turns a crashed attack into a failed result."""

    def run(
        self,
        only: Iterable[str] | None = None,
        backends: Iterable[Backend] = ("builtin", "qemu"),
        on_result: Callable[[AttackResult], None] | None = None,
        skip: Iterable[str] = (),
    ) -> list[AttackResult]:
        """Every registered attack (for `only` threats or attack groups, if given, less those in `skip`)
        on every backend it supports."""
        results: list[AttackResult] = []
        for backend in backends:
            for registered in sorted(ATTACKS, key=lambda a: _threat_number(a.threat)):
                if not is_selected(registered, only, skip, self.quick):
                    continue
                if backend not in registered.backends:
                    continue
                self.say(f"{registered.threat} {registered.title} [{backend}]")
                for result in self._run_one(registered.run, registered.threat, registered.title, backend):
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
        return results

    def _run_one(self, run: Callable, threat: str, title: str, backend: Backend) -> list[AttackResult]:
        started = time.monotonic()
        try:
            results = list(run(self, backend))
        except Exception as exc:
            (self.results_dir / f"{threat}-{backend}-error.txt").write_text(traceback.format_exc())
            results = [
                AttackResult(
                    threat,
                    title,
                    backend,
                    "n/a",
                    "succeeded",
                    f"error: the attack crashed ({type(exc).__name__}: {exc}); see {threat}-{backend}-error.txt",
                    -1,
                )
            ]
        finally:
            # Each attack gets fresh agents: stop the ones it used, before the next.
            self.end_attack()
        elapsed = time.monotonic() - started
        for result in results:
            result.details.setdefault("duration_s", round(elapsed, 1))
        return results


def is_selected(registered: RegisteredAttack, only: Iterable[str] | None, skip: Iterable[str], quick: bool) -> bool:
    """`--only` and `--skip` name threats (T4) or attack groups (ipsec); an attack matches by either.
    An attack in both is one that `--skip` removes from the groups `--only` chose (`--only ipsec --skip T4`)."""
    names = {registered.threat, _group(registered)}
    wanted = {t.upper() for t in only} if only else None
    if wanted is not None and not names & wanted:
        return False
    if names & {t.upper() for t in skip}:
        return False
    # --quick (CI): the IPsec transport's, the disk stream's and post-copy's rows only when asked for by name
    # (`--only ipsec`, `--only storage`, `--only postcopy`; tests/qemu/test_qemu_storage.py and
    # test_qemu_postcopy.py play the disk and post-copy attacks in CI)
    group = _group(registered)
    return not (quick and group in ("IPSEC", "STORAGE", "POSTCOPY") and (wanted is None or group not in wanted))


def _group(registered: RegisteredAttack) -> str:
    """An attack's group, named after its module (sealift.lab.attacks.ipsec -> IPSEC): `--only ipsec`."""
    return registered.run.__module__.rsplit(".", 1)[-1].upper()


def _threat_number(threat: str) -> int:
    digits = "".join(ch for ch in threat if ch.isdigit())
    return int(digits) if digits else 0
