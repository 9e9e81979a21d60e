"""Code every GSE daemon shares: config, lifecycle, TLS, discovery, the dbproxy client, metrics, logging."""
