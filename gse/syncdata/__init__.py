"""syncdata: follows the host identities of the CMDB (or of files) and keeps every agent's identity file
current (spec section 11)."""
