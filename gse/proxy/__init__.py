"""The cloud-area proxy (PA, spec section 12): agent access, data and file relays, reachability pings."""
