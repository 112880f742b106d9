"""SealiftError, the root error: its reason code (class default, per-instance override), each subclass's own."""

from __future__ import annotations

import importlib
import pkgutil
import re

import sealift
from sealift.errors import SealiftError

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(all_subclasses(sub))
    return found


def sealift_error_classes() -> list[type[SealiftError]]:
    """Every SealiftError subclass defined in sealift, after importing all of sealift's modules."""
    for module in pkgutil.walk_packages(sealift.__path__, "sealift."):
        if not module.name.endswith(".__main__"):  # __main__ runs the CLI
            importlib.import_module(module.name)
    return [cls for cls in all_subclasses(SealiftError) if cls.__module__.startswith("sealift.")]


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_code_defaults_to_the_class_one_and_reason_is_the_message() -> None:
    error = SealiftError("the order expired")
    assert error.code == "sealift_error"
    assert error.reason == "the order expired"
    assert str(error) == "the order expired"


def test_an_instance_may_carry_its_own_code() -> None:
    error = SealiftError("the order expired", code="order_expired")
    assert error.code == "order_expired"
    assert SealiftError.code == "sealift_error"  # the class default stays


def test_a_subclass_sets_its_own_code_without_changing_its_base() -> None:
    from sealift.wire.errors import ProtocolError

    class Probe(ProtocolError):
        code = "probe_error"

    assert Probe("x").code == "probe_error"
    plain = ProtocolError("bad frame")
    assert plain.code == "protocol_error" and plain.reason == "bad frame"


def test_existing_bases_are_kept() -> None:
    from sealift.ipsec.charon import CharonError
    from sealift.ipsec.tunnel import IpsecError
    from sealift.ipsec.vici_client import ViciError
    from sealift.security.errors import SecurityError

    for cls in (CharonError, IpsecError, ViciError):
        assert issubclass(cls, RuntimeError) and issubclass(cls, SealiftError)
    assert issubclass(SecurityError, SealiftError)


def test_every_subclass_has_its_own_snake_case_code() -> None:
    classes = sealift_error_classes()
    assert len(classes) > 30, "the error classes were not found"
    owners: dict[str, str] = {SealiftError.code: qualified(SealiftError)}
    for cls in classes:
        name = qualified(cls)
        code = cls.code
        assert isinstance(code, str) and SNAKE_CASE.match(code), f"{name}: code {code!r} is not snake_case"
        assert code not in owners, f"{name} and {owners.get(code)} share the code {code!r}"
        owners[code] = name
