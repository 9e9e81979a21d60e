"""The task servers and file servers of the cluster as a daemon sees them in ZooKeeper, with their stubs.

One registry for every caller of the task servers' internal service (the API server dispatching tasks,
task servers forwarding to the peer holding an agent) and of the file servers (task servers coordinating
transfers). Views come from `Discovery.watch_service`; channels from one `rpc.ChannelPool`.
"""

from __future__ import annotations

from gse.pb import file_pb2_grpc as fpb_grpc
from gse.pb import taskserver_pb2_grpc as tpb_grpc

from .rpc import ChannelPool
from .tls import TLSMaterial


class Peers:
    """node id -> address of every task server (`task_address`) and file server (`address`, load)."""

    def __init__(self, tls: TLSMaterial):
        self.pool = ChannelPool(tls)
        self.taskservers: dict[str, str] = {}                  # node id -> task_address
        self.fileservers: dict[str, tuple[int, str]] = {}      # node id -> (load, address)

    def on_taskservers(self, view: dict[str, dict]) -> None:
        """Discovery callback for the `taskserver` service."""
        self.taskservers = {n: i["task_address"] for n, i in view.items() if i.get("task_address")}
        self._retain()

    def on_fileservers(self, view: dict[str, dict]) -> None:
        """Discovery callback for the `fileserver` service."""
        self.fileservers = {n: (i.get("load", 0), i["address"]) for n, i in view.items() if i.get("address")}
        self._retain()

    def _retain(self) -> None:
        self.pool.retain([*self.taskservers.values(), *(a for _l, a in self.fileservers.values())])

    def task(self, node: str) -> tpb_grpc.TaskServiceStub | None:
        """The internal task service of task server `node`; None when it is not registered (gone)."""
        addr = self.taskservers.get(node)
        return tpb_grpc.TaskServiceStub(self.pool.get(addr)) if addr else None

    def task_address(self, node: str) -> str | None:
        """The internal task address of task server `node`; None when it is not registered (gone)."""
        return self.taskservers.get(node)

    def file(self, address: str) -> fpb_grpc.FileServiceStub:
        """The file service at `address`."""
        return fpb_grpc.FileServiceStub(self.pool.get(address))

    def pick_fileserver(self) -> str | None:
        """The address of the least loaded file server; None when none is registered."""
        if not self.fileservers:
            return None
        return min(self.fileservers.values())[1]

    async def close(self) -> None:
        """Close every channel to the task servers and file servers."""
        await self.pool.close()
