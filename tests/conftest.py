"""Fixtures for every test directory: a command's --json output against its schema in docs/schemas/,
and the in-path relay between two agents that attack tests tamper with or cut."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sealift.lab.relay import Relay

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def load_schemas() -> dict[str, dict[str, Any]]:
    """Every schema in docs/schemas/, by file name without `.schema.json` (demo, migrate, vm-list, ...)."""
    return {path.name.removesuffix(".schema.json"): json.loads(path.read_text()) for path in SCHEMAS.glob("*.json")}


@pytest.fixture(scope="session")
def check_json() -> Callable[[str, object], None]:
    """check_json("vm-list", output): fails with the most relevant schema violation, if there is one.

    The command schemas refer to common.schema.json by $id; all of them are
    registered, so the references resolve without any network access.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    from referencing import Registry, Resource

    schemas = load_schemas()
    registry: Registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )

    def check(name: str, output: object) -> None:
        validator = Draft202012Validator(schemas[name], registry=registry)
        error = best_match(validator.iter_errors(output))
        if error is not None and error.validator == "oneOf" and error.context:
            # A command prints its output or the failure object: say what is wrong with the one it meant.
            meant = 1 if isinstance(output, dict) and output.get("status") == "failed" and "code" in output else 0
            error = best_match(e for e in error.context if e.relative_schema_path[0] == meant) or error
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "(top)"
            pytest.fail(f"`{name}` output does not match docs/schemas/{name}.schema.json at {where}: {error.message}")

    return check


@pytest.fixture
def relay() -> Iterator[Relay]:
    """A relay the tests put between two agents (LocalCluster peer_routes) to tamper with or cut the link."""
    relay = Relay()
    yield relay
    relay.close()
