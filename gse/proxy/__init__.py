"""Proxy (PA): agent access and transit for a cloud area (not built yet)."""
