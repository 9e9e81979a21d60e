"""Process manager: plugin/service registration and operations on hosts (not built yet)."""
