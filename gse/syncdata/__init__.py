"""Syncdata: follows CMDB host identity and pushes it to agents (not built yet)."""
