"""The one rule of what counts as an integer in a request body or a document from another platform (spec §4-§12
bodies through gse.apiserver.validate, data routes, CMDB host documents). Failures are BadRequest naming the
field."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import BadRequest

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_INT_TEXT = re.compile(r"\s*([+-]?)([0-9]+)\s*", re.ASCII)


def integer(body: dict, field: str, *, required: bool = True, default: int | None = 0, minimum: int | None = None,
            maximum: int | None = None, where: str = "") -> int | None:
    """`body[field]` as an int by `integer_value`'s rule, within [minimum, maximum] (int64 when not given); an
    absent or null field is `default` when not `required`, else BadRequest "'<where><field>' is required"."""
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"'{where}{field}' is required")
        return default
    return integer_value(value, f"{where}{field}", minimum=minimum, maximum=maximum)


def integer_value(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int: the one rule of what counts as an integer in a request body, for every endpoint (data
    routes and CMDB documents included). Accepted:

    - a JSON integer;
    - a JSON number without a fraction (5.0): JSON has one number type, and encoders differ on how they write
      an integral value;
    - a string of ASCII digits with an optional sign and surrounding blanks ("42", " -1 "): several clients send
      ids and settings as strings (bk-nodeman's global settings, CMDB ids).

    Refused with BadRequest naming `name`: booleans (`true` is no count), fractions (5.5), NaN and infinities,
    other strings ("4.0", "0x10", "1_000", non-ASCII digits) and anything else ("must be an integer"); values
    outside [minimum, maximum] ("must be at least/at most"), which default to the int64 range the wire carries."""
    low = INT64_MIN if minimum is None else minimum
    high = INT64_MAX if maximum is None else maximum
    if isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRequest(f"'{name}' must be an integer")
        value = int(value)
    elif isinstance(value, str):
        m = _INT_TEXT.fullmatch(value)
        if m is None:
            raise BadRequest(f"'{name}' must be an integer")
        sign, digits = m.group(1), m.group(2).lstrip("0") or "0"
        if len(digits) > 19:            # past int64 (and never handed to int(): bounded work)
            raise BadRequest(f"'{name}' must be at least {low}" if sign == "-" else f"'{name}' must be at most {high}")
        value = int(sign + digits)
    elif not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer")
    if value < low:
        raise BadRequest(f"'{name}' must be at least {low}")
    if value > high:
        raise BadRequest(f"'{name}' must be at most {high}")
    return value
