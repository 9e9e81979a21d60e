"""GSE in Python: the BlueKing control plane (agent and server daemons)."""

__version__ = "0.1.0"
