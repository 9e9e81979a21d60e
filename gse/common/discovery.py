"""ZooKeeper behind one adapter: service registration, service watches and live cluster configuration.

Layout under the configured root (default `/gse`):
  <root>/<service>/<node-id>   ephemeral, JSON: addresses and load of one daemon
  <root>/config/<name>         JSON documents applied live (routes, command rules, app credentials, ...)

kazoo runs its own threads. Nothing here blocks the event loop: kazoo's asynchronous calls are bridged to
asyncio futures and every kazoo callback hops onto the loop with `call_soon_threadsafe`. A LOST session
(expiry) re-creates the ephemeral nodes as soon as a new session exists; a SUSPENDED connection keeps
serving with the last known view.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError, NodeExistsError
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry

from .config import ZooKeeperConfig

log = logging.getLogger("gse.discovery")

ServiceView = dict[str, dict]


class Discovery:
    """One daemon's ZooKeeper session (kazoo) bridged to asyncio: its own ephemeral registrations, watches on the
    services it calls, and the live configuration documents it follows. Kazoo callbacks never block; they hop onto the
    loop that called `start`."""

    def __init__(self, cfg: ZooKeeperConfig):
        self.cfg = cfg
        self.root = cfg.root.rstrip("/") or ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.zk = KazooClient(
            hosts=cfg.hosts,
            timeout=cfg.session_timeout_s,
            connection_retry=KazooRetry(max_tries=-1, delay=0.2, backoff=2, max_delay=2.0),
            command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0),
        )
        self._registrations: dict[str, bytes] = {}       # path -> data of our ephemeral nodes
        self._service_watches: dict[str, list[Callable[[ServiceView], Any]]] = {}
        self._views: dict[str, ServiceView] = {}
        self._config_watches: dict[str, list[Callable[[Any], Any]]] = {}
        self._configs: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._connected = asyncio.Event()
        self.session_losses = 0
        self._stopping = False

    # ---- plumbing ---------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """The ZooKeeper path of `parts` under the root: `path("taskserver", node)` -> "/gse/taskserver/<node>"."""
        return "/".join([self.root, *parts])

    def _aio(self, async_result) -> asyncio.Future:
        loop = self.loop
        fut = loop.create_future()

        def done(ar):
            """kazoo's callback (one of its threads): hand the result or the exception to the future on the loop."""
            try:
                value, error = ar.get_nowait(), None
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                value, error = None, exc
            loop.call_soon_threadsafe(_settle, fut, value, error)

        async_result.rawlink(done)
        return fut

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def connected(self) -> bool:
        """True while the session is connected (False while SUSPENDED or LOST, until it connects again)."""
        return self._connected.is_set()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, waiting as long as it takes (logging while ZooKeeper is unreachable)."""
        self.loop = asyncio.get_running_loop()
        self.zk.add_listener(self._listener)
        event = self.zk.start_async()
        ticks = 0
        while not event.is_set() or not self.zk.connected:
            await asyncio.sleep(0.05)
            ticks += 1
            if ticks % 200 == 0:
                log.warning("waiting for zookeeper", extra={"hosts": self.cfg.hosts, "waited_s": ticks // 20})
        self._connected.set()
        await self._ensure_path(self.path("config"))

    async def stop(self) -> None:
        """Stop the background refreshes and close the session (its ephemeral nodes go with it); kazoo's blocking
        close runs in a thread."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        try:
            self.zk.stop()
            self.zk.close()
        except Exception:  # noqa: BLE001 - closing a client that is already gone
            pass

    def _listener(self, state: str) -> None:
        # kazoo thread: never block here.
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._on_state, state)

    def _on_state(self, state: str) -> None:
        if self._stopping:
            return
        if state == KazooState.CONNECTED:
            log.info("zookeeper connected")
            self._connected.set()
            self._spawn(self._restore())
        elif state == KazooState.SUSPENDED:
            log.warning("zookeeper connection suspended; serving with the last known view")
            self._connected.clear()
        elif state == KazooState.LOST:
            self.session_losses += 1
            log.warning("zookeeper session lost; ephemeral nodes will be re-created")
            self._connected.clear()

    async def _restore(self) -> None:
        """After (re)connecting: make sure our ephemeral nodes exist under the current session."""
        for path, data in list(self._registrations.items()):
            try:
                await self._create_ephemeral(path, data)
            except Exception:  # noqa: BLE001 - retried on the next reconnect
                log.exception("re-registration failed", extra={"path": path})
        for service in list(self._service_watches):
            self._spawn(self._refresh_service(service))

    async def _ensure_path(self, path: str) -> None:
        await asyncio.to_thread(self.zk.ensure_path, path)

    async def _create_ephemeral(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        await self._ensure_path(parent)
        try:
            await self._aio(self.zk.create_async(path, data, ephemeral=True))
            log.info("registered", extra={"path": path})
        except NodeExistsError:
            stat = await self._aio(self.zk.exists_async(path))
            if stat is not None and stat.ephemeralOwner == self.zk.client_id[0]:
                await self._aio(self.zk.set_async(path, data))
                return
            # A node left by our previous (expired) session: replace it.
            try:
                await self._aio(self.zk.delete_async(path))
            except NoNodeError:
                pass
            await self._aio(self.zk.create_async(path, data, ephemeral=True))
            log.info("registered (replaced a stale node)", extra={"path": path})

    # ---- registration -----------------------------------------------------------------------------

    async def register(self, service: str, node_id: str, info: dict) -> str:
        """Create the ephemeral node `<root>/<service>/<node_id>` holding `info` as JSON (replacing a node a previous
        session of ours left) and keep it: it is re-created under every new session. Returns its path; raises kazoo
        errors when ZooKeeper refuses."""
        path = self.path(service, node_id)
        data = json.dumps(info, sort_keys=True).encode()
        self._registrations[path] = data
        await self._create_ephemeral(path, data)
        return path

    async def update(self, service: str, node_id: str, info: dict) -> None:
        """Change the data of our node to `info`. Unchanged data costs nothing; while disconnected the new data is
        kept and written when the session is restored, and a failed write is only logged (the next update or reconnect
        writes it)."""
        path = self.path(service, node_id)
        data = json.dumps(info, sort_keys=True).encode()
        if self._registrations.get(path) == data:
            return
        self._registrations[path] = data
        if not self.connected:
            return          # applied by _restore() once connected again
        try:
            try:
                await self._aio(self.zk.set_async(path, data))
            except NoNodeError:
                await self._create_ephemeral(path, data)
        except KazooException as exc:
            log.debug("registration update deferred", extra={"path": path, "error": repr(exc)})

    async def unregister(self, service: str, node_id: str) -> None:
        """Delete our node of `service` and stop re-creating it; a node already gone is not an error."""
        path = self.path(service, node_id)
        self._registrations.pop(path, None)
        if self.connected:
            try:
                await self._aio(self.zk.delete_async(path))
            except KazooException:
                pass        # gone already, or goes with the session

    # ---- service watches --------------------------------------------------------------------------

    def view(self, service: str) -> ServiceView:
        """The last known members of `service`: node id -> the JSON its node holds (a copy; empty when not watched)."""
        return dict(self._views.get(service, {}))

    async def watch_service(self, service: str, callback: Callable[[ServiceView], Any] | None = None) -> ServiceView:
        """Follow the members of `service`; `callback(view)` runs on the loop whenever membership changes."""
        first = service not in self._service_watches
        self._service_watches.setdefault(service, [])
        if callback is not None:
            self._service_watches[service].append(callback)
        if first:
            await self._ensure_path(self.path(service))
            loop = self.loop

            def on_children(children):
                """kazoo ChildrenWatch callback (kazoo thread): re-read the service on the loop; returning False ends
                the watch once stopping."""
                if not self._stopping and not loop.is_closed():
                    loop.call_soon_threadsafe(self._spawn, self._refresh_service(service, children))
                return not self._stopping

            self.zk.ChildrenWatch(self.path(service), on_children)
        await self._refresh_service(service)
        return self.view(service)

    async def _refresh_service(self, service: str, children: list[str] | None = None) -> None:
        try:
            if children is None:
                children = await self._aio(self.zk.get_children_async(self.path(service)))
            futs = [self._aio(self.zk.get_async(self.path(service, c))) for c in children]
            results = await asyncio.gather(*futs, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - keep the last view while ZooKeeper is away
            log.debug("service refresh failed", extra={"service": service, "error": repr(exc)})
            return
        view: ServiceView = {}
        for child, res in zip(children, results):
            if isinstance(res, Exception):
                continue
            try:
                view[child] = json.loads(res[0] or b"{}")
            except ValueError:
                log.warning("bad registration data", extra={"service": service, "node": child})
        old = self._views.get(service)
        self._views[service] = view
        if view != old:
            for cb in self._service_watches.get(service, []):
                _call(cb, view)

    async def refresh_loop(self, interval: float) -> None:
        """Re-read the data of watched services (load figures change without membership changes)."""
        while True:
            await asyncio.sleep(interval)
            if self.connected:
                for service in list(self._service_watches):
                    await self._refresh_service(service)

    # ---- live configuration -----------------------------------------------------------------------

    def config(self, name: str, default: Any = None) -> Any:
        """The last value of the config document `name` (from `watch_config`), else `default`."""
        return self._configs.get(name, default)

    async def watch_config(self, name: str, callback: Callable[[Any], Any] | None = None) -> Any:
        """Follow `<root>/config/<name>` (JSON); `callback(value)` runs on the loop on every change."""
        first = name not in self._config_watches
        self._config_watches.setdefault(name, [])
        if callback is not None:
            self._config_watches[name].append(callback)
        if first:
            loop = self.loop
            ready = asyncio.Event()

            def on_data(data, stat):
                """kazoo DataWatch callback (kazoo thread): apply the new document on the loop; returning False ends
                the watch once stopping."""
                if self._stopping or loop.is_closed():
                    return False
                loop.call_soon_threadsafe(self._on_config, name, data, ready)
                return True

            self.zk.DataWatch(self.path("config", name), on_data)
            await ready.wait()
        return self._configs.get(name)

    def _on_config(self, name: str, data: bytes | None, ready: asyncio.Event) -> None:
        try:
            value = json.loads(data) if data else None
        except ValueError:
            log.error("config document is not valid JSON; keeping the previous one", extra={"config": name})
            ready.set()
            return
        self._configs[name] = value
        ready.set()
        for cb in self._config_watches.get(name, []):
            _call(cb, value)

    async def put_config(self, name: str, value: Any) -> None:
        """Write the config document `<root>/config/<name>` as JSON (creating the node if needed); every
        `watch_config` of it in the cluster sees the change. Raises kazoo errors when ZooKeeper refuses."""
        path = self.path("config", name)
        data = json.dumps(value, sort_keys=True).encode()
        await self._ensure_path(path)
        await self._aio(self.zk.set_async(path, data))

    async def get_json(self, path: str) -> Any:
        """The JSON document at the absolute path `path`; None when the node is missing or empty. ValueError when its
        data is not JSON."""
        try:
            data, _ = await self._aio(self.zk.get_async(path))
        except NoNodeError:
            return None
        return json.loads(data) if data else None


def _settle(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _call(cb, arg) -> None:
    try:
        res = cb(arg)
        if asyncio.iscoroutine(res):
            asyncio.ensure_future(res)
    except Exception:  # noqa: BLE001 - one bad watcher must not stop the others
        log.exception("watch callback failed")
