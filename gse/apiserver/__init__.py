"""API server: the HTTP API of spec/gse-api.md (v1 ESB and v2)."""
