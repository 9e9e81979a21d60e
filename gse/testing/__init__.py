"""Test support that ships with the package, for the tests, the benchmarks and plugin authors: nothing in the
daemons imports it.

- `gse.testing.plugin`: a collector plugin's side of the agent's IPC sockets (ReportClient, MessageClient).
- `gse.devcluster` (beside this package, used by `gse dev up` too): a real local cluster.
"""
