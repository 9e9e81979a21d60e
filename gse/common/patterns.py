"""Regular expressions that come from users, matched in linear time.

Python's `re` backtracks: a pattern such as `(a+)+$`, or an innocent one on a hostile text, can take
exponential time, and the process that runs it stops serving. Every pattern that a caller or an operator
supplies (high-risk command rules, `regex:` file names) is compiled here with RE2 (google-re2), whose matching
time is linear in the text whatever the pattern, and whose memory per pattern is bounded (`MAX_MEM`). RE2 has
no backreferences and no lookaround; a pattern that uses them is refused with a clear error.

google-re2 releases the GIL while it matches, so a long match run in a thread does not hold up the event loop.
"""

from __future__ import annotations

import re2

MAX_PATTERN_CHARS = 4096
MAX_MEM = 32 << 20          # RE2's memory budget per compiled pattern (it falls back to slower, still linear, NFA)

error = re2.error


def options() -> re2.Options:
    """RE2 options for user patterns: bounded memory, errors raised (never printed by the library)."""
    opts = re2.Options()
    opts.log_errors = False
    opts.max_mem = MAX_MEM
    return opts


def compile_user(pattern: str, *, what: str = "pattern", multiline: bool = False):
    """Compile a user's regular expression with RE2.

    Returns an RE2 regexp (`search`, `fullmatch`, `finditer` on str or UTF-8 bytes). Raises ValueError naming
    `what` for a pattern that is not a string, is longer than MAX_PATTERN_CHARS or does not compile (RE2
    syntax: no backreferences, no lookahead or lookbehind).
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is longer than {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(("(?m)" if multiline else "") + pattern, options())
    except re2.error as exc:
        raise ValueError(f"{what} is not a regular expression RE2 accepts: {_reason(exc)}") from None


def search_set(patterns: list[str], *, multiline: bool = False):
    """One RE2 set of `patterns`: `.Match(text)` gives the indices of every pattern found in `text` in a
    single pass (None when none). Raises ValueError when a pattern or the whole set does not compile."""
    s = re2.Set.SearchSet(options())
    for i, p in enumerate(patterns):
        try:
            s.Add(("(?m)" if multiline else "") + p)
        except re2.error as exc:
            raise ValueError(f"pattern {i} is not a regular expression RE2 accepts: {_reason(exc)}") from None
    try:
        s.Compile()
    except re2.error:
        raise ValueError("the patterns do not compile together (too large)") from None
    return s


def _reason(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    if text.startswith(("b'", 'b"')):
        text = text[2:-1]
    return text
