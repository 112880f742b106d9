"""Who may migrate what, from where to where: the agent's policy file (threat T10).

A TOML file of rules; a migration is allowed if at least one rule allows it,
and denied otherwise (deny by default: an empty file, or no file, allows
nothing):

    [[rule]]
    name = "web tier"                # optional, shown in decisions
    roles = ["admin", "operator"]    # operator roles the rule applies to
    vms = ["web-*"]                  # globs on the VM name, any may match
    labels = ["tier=web"]            # key=value, all must be on the VM
    from = ["host-a", "host-*"]      # globs on the source host
    to = ["host-b"]                  # globs on the destination host

A rule needs `roles`, `from`, `to` and at least one of `vms` or `labels`
(when both are given, both must match), so that "every VM" is always spelled
out (`vms = ["*"]`). Globs are shell-style (`*`, `?`, `[ab]`); VM names
match case-sensitively, host names case-insensitively (as DNS and TLS do).

Auditors may never migrate: a rule naming the role "auditor" is refused when
the file is loaded, and `authorize` denies an auditor whatever the rules say.

The file is checked strictly: an unknown key, a wrong type or an empty list
is an error naming the rule and its line, not a silently ignored rule.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealift.security.errors import PolicyDeniedError, PolicyFileError
from sealift.security.operators import ROLES, Operator, Role

_RULE_KEYS = ("name", "roles", "vms", "labels", "from", "to")
_RULE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*rule[ \t]*\]\]", re.MULTILINE)
_LABEL = re.compile(r"([a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?)=([A-Za-z0-9._-]{0,63})")
_MAX_PATTERN = 256


@dataclass(frozen=True)
class Rule:
    index: int  # 0-based position in the file; messages say "rule {index + 1}"
    name: str | None
    roles: frozenset[Role]
    vms: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    sources: tuple[str, ...]  # lower-case globs
    destinations: tuple[str, ...]  # lower-case globs
    line: int | None  # line of its [[rule]] header, when known

    @property
    def title(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        named = f" {self.name!r}" if self.name else ""
        return f"rule {self.index + 1}{named}{where}"

    def mismatches(self, role: Role, vm: str, labels: Mapping[str, str], source: str, destination: str) -> list[str]:
        """Which parts of this rule do not match (empty list: the rule allows it)."""
        wrong = []
        if role not in self.roles:
            wrong.append(f"role {role.value} not in {sorted(r.value for r in self.roles)}")
        if self.vms and not any(fnmatch.fnmatchcase(vm, p) for p in self.vms):
            wrong.append(f"VM {vm!r} matches none of {list(self.vms)}")
        missing = [f"{k}={v}" for k, v in self.labels if labels.get(k) != v]
        if missing:
            wrong.append(f"VM lacks labels {missing}")
        if not any(fnmatch.fnmatchcase(source.lower(), p) for p in self.sources):
            wrong.append(f"source {source!r} matches none of {list(self.sources)}")
        if not any(fnmatch.fnmatchcase(destination.lower(), p) for p in self.destinations):
            wrong.append(f"destination {destination!r} matches none of {list(self.destinations)}")
        return wrong


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    rule_index: int | None  # 0-based index of the allowing rule, None when denied
    reason: str

    def require(self, order_id: str | None = None) -> None:
        """Raise PolicyDeniedError (an OrderError, for the audit log) unless allowed."""
        if not self.allowed:
            prefix = f"order {order_id} refused: " if order_id else ""
            raise PolicyDeniedError(prefix + self.reason, order_id)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str  # the file it came from, for messages

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and check a policy file; PolicyFileError says what is wrong and where."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyFileError(
                f"policy file {path} does not exist (without a policy every migration is denied)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyFileError(f"cannot read policy file {path}: {exc}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> Policy:
        """A policy from the text of a policy file (read once by the caller, who may also digest it)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyFileError(f"policy file {source} is not valid TOML: {exc}") from None
        headers = [text.count("\n", 0, m.start()) + 1 for m in _RULE_HEADER.finditer(text)]
        return cls.from_dict(data, source=source, _rule_lines=headers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<policy>", *, _rule_lines: Sequence[int] = ()) -> Policy:
        """Build a policy from parsed TOML (`{"rule": [ {...}, ... ]}`), checked as `load` does."""
        if not isinstance(data, Mapping):
            raise PolicyFileError(f"{source}: a policy is a table with [[rule]] entries")
        unknown = sorted(set(data) - {"rule"})
        if unknown:
            raise PolicyFileError(f"{source}: unknown top-level key(s) {unknown}; a policy has only [[rule]] tables")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise PolicyFileError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        # Line numbers only if every rule was written as a [[rule]] header.
        lines: Sequence[int | None] = _rule_lines if len(_rule_lines) == len(raw_rules) else [None] * len(raw_rules)
        rules = tuple(_parse_rule(raw, index, lines[index], source) for index, raw in enumerate(raw_rules))
        return cls(rules=rules, source=source)

    @classmethod
    def deny_all(cls, source: str = "<no policy file>") -> Policy:
        """The policy of an agent without a policy file: nothing is allowed."""
        return cls(rules=(), source=source)

    def authorize(
        self,
        operator: Operator,
        vm: str,
        labels: Mapping[str, str] | None,
        source: str,
        destination: str,
    ) -> PolicyDecision:
        """May `operator` migrate `vm` (with `labels`) from `source` to `destination`?

        `labels` should come from the agent's own record of the VM: labels
        written in an order are only the operator's claim.
        """
        labels = labels or {}
        what = f"migrate VM {vm!r} from {source} to {destination}"
        if operator.role is Role.AUDITOR:
            return PolicyDecision(False, None, f"operator {operator} may not {what}: auditors may never migrate")
        closest: tuple[int, Rule, list[str]] | None = None
        for rule in self.rules:
            wrong = rule.mismatches(operator.role, vm, labels, source, destination)
            if not wrong:
                return PolicyDecision(
                    True, rule.index, f"operator {operator} may {what}: allowed by {rule.title} of {self.source}"
                )
            if closest is None or len(wrong) < closest[0]:
                closest = (len(wrong), rule, wrong)
        if closest is None:
            hint = f"{self.source} has no rules"
        else:
            _, rule, wrong = closest
            hint = f"closest is {rule.title}: {'; '.join(wrong)}"
        return PolicyDecision(
            False,
            None,
            f"operator {operator} may not {what}: no rule of {self.source} allows it (deny by default; {hint})",
        )


# --------------------------------------------------------------------------
# Parsing


def _parse_rule(raw: Any, index: int, line: int | None, source: str) -> Rule:
    where = f"{source}: rule {index + 1}" + (f" (line {line})" if line else "")
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{where}: a rule must be a table")
    for key in raw:
        if key not in _RULE_KEYS:
            close = difflib.get_close_matches(key, _RULE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyFileError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(_RULE_KEYS)}")
    for key in ("roles", "from", "to"):
        if key not in raw:
            raise PolicyFileError(f"{where}: missing required key {key!r}")
    if "vms" not in raw and "labels" not in raw:
        raise PolicyFileError(f"{where}: say which VMs it covers with 'vms' (e.g. [\"*\"]) and/or 'labels'")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise PolicyFileError(f"{where}: 'name' must be a non-empty string")

    roles = set()
    for role in _string_list(raw, "roles", where):
        if role not in ROLES:
            raise PolicyFileError(f"{where}: unknown role {role!r}; roles are {', '.join(sorted(ROLES))}")
        if role == Role.AUDITOR.value:
            raise PolicyFileError(f"{where}: auditors may never migrate; remove 'auditor'")
        roles.add(Role(role))

    labels = []
    if "labels" in raw:
        for label in _string_list(raw, "labels", where):
            match = _LABEL.fullmatch(label)
            if not match:
                raise PolicyFileError(f"{where}: label {label!r} is not of the form key=value")
            labels.append((match.group(1), match.group(2)))

    return Rule(
        index=index,
        name=name,
        roles=frozenset(roles),
        vms=tuple(_string_list(raw, "vms", where)) if "vms" in raw else (),
        labels=tuple(labels),
        sources=tuple(p.lower() for p in _string_list(raw, "from", where)),
        destinations=tuple(p.lower() for p in _string_list(raw, "to", where)),
        line=line,
    )


def _string_list(raw: dict[str, Any], key: str, where: str) -> list[str]:
    value = raw[key]
    if not isinstance(value, list) or not value:
        raise PolicyFileError(f"{where}: {key!r} must be a non-empty list of strings")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > _MAX_PATTERN:
            raise PolicyFileError(
                f"{where}: {key!r} must hold non-empty strings of at most {_MAX_PATTERN} characters, got {item!r}"
            )
    return list(value)
