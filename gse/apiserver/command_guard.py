"""The high-risk command guard: commands and script contents are matched against rules before dispatch.

A rule is `{name, pattern (a regular expression, RE2 syntax), severity: warn | block, message}`. `block`
refuses the whole task before any agent receives it; `warn` lets it run and records the warning on every
result item. Rules come from the cluster configuration in ZooKeeper (`<root>/config/command_rules`) and apply
live:

    {"include_defaults": true, "rules": [{"name": "...", "pattern": "...", "severity": "warn", "message": "..."}]}

The default set covers the classic disasters.

Cost: the text is user input of up to tens of MiB, so matching must stay linear whatever the text. All
rules are compiled into one RE2 set (`gse.common.patterns`) and each text is scanned once for all of them
(16 MiB in about 30-50 ms on this project's test machine); only a rule the set found is matched again on its
own, when it needs a check RE2 cannot express (the fork bomb's "same name three times"). `check_async` runs
the scan in a thread (RE2 releases the GIL) under a time bound, so the event loop keeps serving.
A pattern RE2 does not accept (backreferences, lookaround) is refused when the rules are applied, and the
previous rules stay.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from gse.common import patterns
from gse.common.errors import Unavailable

log = logging.getLogger("gse.apiserver.guard")

MAX_RULES = 256
DEFAULT_TIME_BOUND_S = 5.0
# Matches of a rule with a `confirm` check examined per text; a text with more candidates than this (thousands
# of fork-bomb-shaped functions) counts as matching: the check stays bounded and fails closed.
MAX_CANDIDATES = 10_000

_SYS_DIRS = r"(?:\*|bin|boot|dev|etc|home|lib|lib32|lib64|opt|proc|root|sbin|srv|sys|usr|var)?"
# What may follow a path argument: matched (RE2 has no lookahead), which only moves where the match ends.
_END = r"(?:\s|$|;|&|\||\)|`)"


@dataclass(frozen=True)
class Rule:
    """One rule; `confirm(match)` (default rules only) rejects a match the pattern alone cannot rule out."""

    name: str
    pattern: str
    severity: str
    message: str
    confirm: Callable | None = None


def _same_name(match) -> bool:
    """A fork bomb calls itself twice in its body: `f(){ f|f& }` (RE2 has no backreferences)."""
    return match.group(1) == match.group(2) == match.group(3)


DEFAULT_RULES = (
    Rule("rm-root", r"\brm\s+(?:-{1,2}[\w-]+\s+)*(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:\s+-{1,2}[\w-]+)*"
         r"\s+(?:--\s+)?[\"']?/" + _SYS_DIRS + r"/?[\"']?" + _END,
         "block", "recursive delete of / or of a top-level system directory"),
    Rule("mkfs", r"(?:^|[\s;&|(`])mkfs(?:\.\w+)?\b", "block", "making a filesystem destroys the device's data"),
    Rule("dd-block-device", r"\bdd\b[^\n;|&]*\bof=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|dm-|md|disk|mapper/)",
         "block", "dd onto a block device"),
    Rule("fork-bomb", r"(\w+|:)\s*\(\)\s*\{\s*(\w+|:)\s*\|\s*(\w+|:)\s*&\s*\}", "block", "fork bomb",
         confirm=_same_name),
    Rule("shutdown", r"(?:^|[;&|(`]\s*|\bsudo\s+)(?:/s?bin/|/usr/s?bin/)?(?:shutdown|reboot|halt|poweroff)\b"
         r"|\binit\s+[06]\b|\bsystemctl\s+(?:poweroff|reboot|halt|kexec)\b|\btelinit\s+[06]\b",
         "block", "shutting down or rebooting the host"),
    Rule("chmod-777-root", r"\bchmod\s+(?:-{1,2}[\w-]+\s+)*(?:-[a-zA-Z]*R[a-zA-Z]*|--recursive)(?:\s+-{1,2}[\w-]+)*"
         r"\s+(?:0?777|a\+rwx|ugo\+rwx)\s+/" + _SYS_DIRS + r"/?" + _END,
         "block", "recursive chmod 777 of / or a system directory"),
    # `>` but not `>>` (appending is not overwriting): the character before it is matched, not looked behind.
    Rule("overwrite-passwd", r"(?:^|[^>])>\s*/etc/(?:passwd|shadow|group|gshadow|sudoers)\b"
         r"|\b(?:cp|mv|install|tee)\s+(?:-[\w-]+\s+)*\S+\s+/etc/(?:passwd|shadow)\b",
         "block", "overwriting the account database"),
)


class _Compiled:
    """A rule set compiled once: the RE2 set for the single scan, each rule's own regexp for confirmation."""

    def __init__(self, rules: list[Rule]):
        if len(rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} rules")
        self.rules = rules
        self.one: list = []
        for r in rules:
            self.one.append(patterns.compile_user(r.pattern, what=f"rule {r.name!r} pattern", multiline=True))
        self.set = patterns.search_set([r.pattern for r in rules], multiline=True) if rules else None

    def found(self, text: bytes) -> list[int]:
        """Indices of the rules that match `text`, in rule order."""
        if self.set is None:
            return []
        hits = self.set.Match(text) or []
        out = []
        for i in sorted(hits):
            confirm = self.rules[i].confirm
            if confirm is None or _confirmed(confirm, self.one[i].finditer(text)):
                out.append(i)
        return out


def _confirmed(confirm: Callable, matches) -> bool:
    for n, m in enumerate(matches):
        if n >= MAX_CANDIDATES or confirm(m):
            return True
    return False


class CommandGuard:
    """The rules in force and the check of a task's texts against them (thread-safe: rules swap atomically)."""

    def __init__(self, time_bound_s: float = DEFAULT_TIME_BOUND_S):
        self._compiled = _Compiled(list(DEFAULT_RULES))
        self.time_bound_s = time_bound_s
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="command-guard")

    @property
    def rules(self) -> list[Rule]:
        """The rules in force (defaults plus configured ones), in matching order."""
        return list(self._compiled.rules)

    def apply_config(self, doc) -> None:
        """ZooKeeper watch callback: replace the rule set; a bad document keeps the previous rules."""
        if doc is None:
            self._compiled = _Compiled(list(DEFAULT_RULES))
            return
        try:
            rules = list(DEFAULT_RULES) if doc.get("include_defaults", True) else []
            items = doc.get("rules", [])
            if not isinstance(items, list):
                raise ValueError("rules must be a list")
            for i, item in enumerate(items):
                rule = Rule(str(item["name"]), item["pattern"], str(item.get("severity", "block")),
                            str(item.get("message", "")))
                if rule.severity not in ("warn", "block"):
                    raise ValueError(f"rules[{i}].severity must be warn or block")
                rules.append(rule)
            compiled = _Compiled(rules)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("command rules not applied; keeping the previous ones", extra={"error": str(exc)})
            return
        self._compiled = compiled
        log.info("command rules applied", extra={"count": len(rules)})

    def check(self, texts) -> tuple[Rule | None, list[Rule]]:
        """(the first blocking rule matched or None, the warning rules matched) for `texts` (str or UTF-8
        bytes). Linear in the total size of the texts."""
        compiled = self._compiled
        warnings: list[Rule] = []
        for text in texts:
            if isinstance(text, str):
                text = text.encode("utf-8", "surrogatepass")
            for i in compiled.found(text):
                rule = compiled.rules[i]
                if rule.severity == "block":
                    return rule, warnings
                if rule not in warnings:
                    warnings.append(rule)
        return None, warnings

    async def check_async(self, texts) -> tuple[Rule | None, list[Rule]]:
        """`check` in a worker thread, within `time_bound_s`: the event loop serves other callers meanwhile.
        A check that does not finish in time refuses the task (Unavailable, 1000503): nothing unchecked runs."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self.check, list(texts))
        try:
            return await asyncio.wait_for(fut, self.time_bound_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"the high-risk command check did not finish within {self.time_bound_s:g} s; "
                              "the task was not run") from None

    def close(self) -> None:
        """Stop the checking threads without waiting."""
        self._pool.shutdown(wait=False, cancel_futures=True)

