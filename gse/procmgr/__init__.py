"""procmgr: process registration, operations and status for plugins and services on hosts (spec sections 3, 8)."""
