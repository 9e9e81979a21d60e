"""Task server: agent access point, session keeper, balancer (and, with the task issue, dispatcher)."""
