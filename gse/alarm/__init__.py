"""Alarm: the elected leader reports agents whose heartbeat timed out (not built yet)."""
