"""The agent that runs on every managed host."""

import os

# The agent forks task processes from a process that runs gRPC threads. gRPC's fork handlers are meant
# for children that go on using gRPC; ours exec at once, and with the handlers on, a child forked while a
# poller thread is busy can abort inside gRPC before it execs. Off, before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
