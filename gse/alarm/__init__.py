"""The alarm daemon: one elected leader reports lost agents on DataID 1000 (spec section 10)."""
