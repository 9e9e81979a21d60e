"""Data server: receives agent data by DataID and routes it to Kafka, Redis or files (issue: data collection)."""
