"""The high-risk command guard: commands and script contents are matched against rules before dispatch.

A rule is `{name, pattern (a regular expression), severity: warn | block, message}`. `block` refuses the
whole task before any agent receives it; `warn` lets it run and records the warning on every result item.
Rules come from the cluster configuration in ZooKeeper (`<root>/config/command_rules`) and apply live:

    {"include_defaults": true, "rules": [{"name": "...", "pattern": "...", "severity": "warn", "message": "..."}]}

The default set covers the classic disasters.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("gse.apiserver.guard")

_SYS_DIRS = r"(?:\*|bin|boot|dev|etc|home|lib|lib32|lib64|opt|proc|root|sbin|srv|sys|usr|var)?"
_END = r"(?=\s|$|;|&|\||\)|`)"


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str
    severity: str
    message: str

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern, re.MULTILINE)


DEFAULT_RULES = (
    Rule("rm-root", r"\brm\s+(?:-{1,2}[\w-]+\s+)*(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:\s+-{1,2}[\w-]+)*"
         r"\s+(?:--\s+)?[\"']?/" + _SYS_DIRS + r"/?[\"']?" + _END,
         "block", "recursive delete of / or of a top-level system directory"),
    Rule("mkfs", r"(?:^|[\s;&|(`])mkfs(?:\.\w+)?\b", "block", "making a filesystem destroys the device's data"),
    Rule("dd-block-device", r"\bdd\b[^\n;|&]*\bof=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|dm-|md|disk|mapper/)",
         "block", "dd onto a block device"),
    Rule("fork-bomb", r"(\w+|:)\s*\(\)\s*\{\s*\1\s*\|\s*\1\s*&\s*\}\s*;?\s*\1", "block", "fork bomb"),
    Rule("shutdown", r"(?:^|[;&|(`]\s*|\bsudo\s+)(?:/s?bin/|/usr/s?bin/)?(?:shutdown|reboot|halt|poweroff)\b"
         r"|\binit\s+[06]\b|\bsystemctl\s+(?:poweroff|reboot|halt|kexec)\b|\btelinit\s+[06]\b",
         "block", "shutting down or rebooting the host"),
    Rule("chmod-777-root", r"\bchmod\s+(?:-{1,2}[\w-]+\s+)*(?:-[a-zA-Z]*R[a-zA-Z]*|--recursive)(?:\s+-{1,2}[\w-]+)*"
         r"\s+(?:0?777|a\+rwx|ugo\+rwx)\s+/" + _SYS_DIRS + r"/?" + _END,
         "block", "recursive chmod 777 of / or a system directory"),
    Rule("overwrite-passwd", r"(?<!>)>\s*/etc/(?:passwd|shadow|group|gshadow|sudoers)\b"
         r"|\b(?:cp|mv|install|tee)\s+(?:-[\w-]+\s+)*\S+\s+/etc/(?:passwd|shadow)\b",
         "block", "overwriting the account database"),
)


class CommandGuard:
    def __init__(self):
        self._rules: list[tuple[Rule, re.Pattern]] = [(r, r.compiled()) for r in DEFAULT_RULES]

    @property
    def rules(self) -> list[Rule]:
        return [r for r, _ in self._rules]

    def apply_config(self, doc) -> None:
        """ZooKeeper watch callback: replace the rule set; a bad document keeps the previous rules."""
        if doc is None:
            self._rules = [(r, r.compiled()) for r in DEFAULT_RULES]
            return
        try:
            rules = list(DEFAULT_RULES) if doc.get("include_defaults", True) else []
            for i, item in enumerate(doc.get("rules", [])):
                rule = Rule(str(item["name"]), str(item["pattern"]), str(item.get("severity", "block")),
                            str(item.get("message", "")))
                if rule.severity not in ("warn", "block"):
                    raise ValueError(f"rules[{i}].severity must be warn or block")
                rules.append(rule)
            compiled = [(r, r.compiled()) for r in rules]
        except (KeyError, TypeError, ValueError, AttributeError, re.error) as exc:
            log.error("command rules not applied; keeping the previous ones", extra={"error": repr(exc)})
            return
        self._rules = compiled
        log.info("command rules applied", extra={"count": len(compiled)})

    def check(self, texts) -> tuple[Rule | None, list[Rule]]:
        """(the first blocking rule matched or None, the warning rules matched)."""
        warnings: list[Rule] = []
        for text in texts:
            for rule, rx in self._rules:
                if rx.search(text):
                    if rule.severity == "block":
                        return rule, warnings
                    if rule not in warnings:
                        warnings.append(rule)
        return None, warnings
