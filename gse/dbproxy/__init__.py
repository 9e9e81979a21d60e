"""dbproxy: the only door to Redis (sharded, replicated, batched)."""
