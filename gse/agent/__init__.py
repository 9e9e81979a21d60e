"""The agent that runs on every managed host."""
