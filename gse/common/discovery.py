"""ZooKeeper behind one adapter: service registration, service watches and live cluster configuration.

Layout under the configured root (default `/gse`):
  <root>/<service>/<node-id>   ephemeral, JSON: addresses and load of one daemon
  <root>/config/<name>         JSON documents applied live (routes, command rules, app credentials, ...)
  <root>/election/<name>/      contenders of a leader election (kazoo's Election recipe; `Leadership`)

kazoo runs its own threads. Nothing here blocks the event loop: kazoo's asynchronous calls are bridged to
asyncio futures and every kazoo callback hops onto the loop with `call_soon_threadsafe`. A LOST session
(expiry) re-creates the ephemeral nodes as soon as a new session exists; a SUSPENDED connection keeps
serving with the last known view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Awaitable, Callable

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError, NodeExistsError
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry

from .aio import spawn
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
        self._state_listeners: list[Callable[[str], Any]] = []     # on the loop: KazooState values

    # ---- plumbing ---------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """The ZooKeeper path of `parts` under the root: `path("taskserver", node)` -> "/gse/taskserver/<node>"."""
        return "/".join([self.root, *parts])

    def aio(self, async_result) -> asyncio.Future:
        """A kazoo IAsyncResult (what `zk.get_async(path)` and the other `*_async` calls return) as a future
        on this Discovery's loop: `data, stat = await d.aio(d.zk.get_async(path))` gives its value, or raises
        its exception (kazoo's NoNodeError, BadVersionError, ...), without blocking the loop on a kazoo
        thread."""
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

    def add_state_listener(self, callback: Callable[[str], Any]) -> None:
        """`callback(state)` on the loop for every connection state change (KazooState CONNECTED, SUSPENDED,
        LOST), after this adapter's own handling."""
        self._state_listeners.append(callback)

    def _on_state(self, state: str) -> None:
        if self._stopping:
            return
        self._handle_state(state)
        for cb in list(self._state_listeners):
            _call(cb, state)

    def _handle_state(self, state: str) -> None:
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
            await self.aio(self.zk.create_async(path, data, ephemeral=True))
            log.info("registered", extra={"path": path})
        except NodeExistsError:
            stat = await self.aio(self.zk.exists_async(path))
            if stat is not None and stat.ephemeralOwner == self.zk.client_id[0]:
                await self.aio(self.zk.set_async(path, data))
                return
            # A node left by our previous (expired) session: replace it.
            try:
                await self.aio(self.zk.delete_async(path))
            except NoNodeError:
                pass
            await self.aio(self.zk.create_async(path, data, ephemeral=True))
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
                await self.aio(self.zk.set_async(path, data))
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
                await self.aio(self.zk.delete_async(path))
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
                children = await self.aio(self.zk.get_children_async(self.path(service)))
            futs = [self.aio(self.zk.get_async(self.path(service, c))) for c in children]
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
        await self.aio(self.zk.set_async(path, data))

    async def get_json(self, path: str) -> Any:
        """The JSON document at the absolute path `path`; None when the node is missing or empty. ValueError when its
        data is not JSON."""
        try:
            data, _ = await self.aio(self.zk.get_async(path))
        except NoNodeError:
            return None
        return json.loads(data) if data else None


class Leadership:
    """One contender in the leader election `name` (kazoo's Election recipe under `<root>/election/<name>`).

    `run(work)` contends for ever: while this contender holds the leadership *and* its ZooKeeper connection
    is up, the coroutine `work()` runs; it is cancelled the moment the connection is SUSPENDED (another
    contender may be elected once our session expires, so we stop acting at once) and started again if the
    connection comes back with the same session. A LOST session gives the leadership up (its lock node went
    with the session) and the contender queues again. When the leader dies, the next contender is elected
    once the dead one's session expires: within `zookeeper.session_timeout_s`.

    kazoo's recipe blocks, so it runs on a thread of its own; what it learns hops onto the loop.
    `leading` is True while `work()` may run.
    """

    def __init__(self, discovery: Discovery, name: str, identifier: str):
        self.discovery = discovery
        self.name = name
        self.identifier = identifier
        self.path = discovery.path("election", name)
        self.elected = False                # holds the lock (thread's view, copied onto the loop)
        self.elections = 0                  # how many times this contender was elected
        self._release = threading.Event()   # set: give the leadership up (stopping, session lost)
        self._holding = False               # the election thread holds the lock (thread's own view)
        self._stopping = False
        self._changed = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._election = None
        discovery.add_state_listener(self._on_state)

    @property
    def leading(self) -> bool:
        """True while `work()` may run: elected, connected, and not stopping."""
        return self.elected and self.discovery.connected and not self._stopping

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST and self._holding:
            self._release.set()             # the lock node is gone with the session: contend again
        self._changed.set()

    def _set_elected(self, value: bool) -> None:
        self.elected = value
        if value:
            self.elections += 1
        log.info("leadership " + ("won" if value else "given up"), extra={"election": self.name,
                                                                          "identifier": self.identifier})
        self._changed.set()

    def _contend(self, loop: asyncio.AbstractEventLoop) -> None:
        """The election thread: queue, hold while elected, queue again after a loss, until stopped."""
        import time
        while not self._stopping:
            self._release.clear()
            try:
                self._election = self.discovery.zk.Election(self.path, self.identifier)
                self._election.run(self._hold, loop)
            except Exception as exc:  # noqa: BLE001 - connection trouble while queueing or releasing: queue again
                log.info("election interrupted; contending again", extra={"election": self.name,
                                                                          "error": repr(exc)})
                time.sleep(0.5)

    def _hold(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.is_closed():
            return
        self._holding = True
        loop.call_soon_threadsafe(self._set_elected, True)
        self._release.wait()
        self._holding = False
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._set_elected, False)

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Contend for ever; run `work()` while leading (see the class). A `work()` that returns or fails
        while still leading is started again after a second."""
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._contend, args=(loop,), name=f"election-{self.name}",
                                        daemon=True)
        self._thread.start()
        task: asyncio.Task | None = None
        try:
            while True:
                if self.leading and task is None:
                    task = asyncio.ensure_future(work())
                elif not self.leading and task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    task = None
                self._changed.clear()
                waiters = [asyncio.ensure_future(self._changed.wait())]
                if task is not None:
                    waiters.append(task)
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                waiters[0].cancel()
                if task is not None and task.done():
                    if not task.cancelled() and task.exception() is not None:
                        log.error("leader work failed; starting it again", exc_info=task.exception(),
                                  extra={"election": self.name})
                    task = None
                    await asyncio.sleep(1.0)
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        """Leave the election (give the leadership up if held). Call before `Discovery.stop()`."""
        self._stopping = True
        self._release.set()
        election = self._election
        if election is not None:
            election.cancel()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
        self._changed.set()

    async def contenders(self) -> list[str]:
        """The identifiers of the contenders, the leader first."""
        election = self._election or self.discovery.zk.Election(self.path, self.identifier)
        return await asyncio.to_thread(election.contenders)


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
            spawn(res, "discovery callback")
    except Exception:  # noqa: BLE001 - one bad watcher must not stop the others
        log.exception("watch callback failed")
