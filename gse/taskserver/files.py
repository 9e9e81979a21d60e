"""File transfers on the task server.

The task server holding a transfer's source agent coordinates it: it creates the transfer on a file
server (so a transfer exists only because a task server made it), asks the source for its manifest
(the files found, their torrents), registers the torrents, writes every target's initial result items
and sends one FileTarget frame to all targets (through the task servers holding them, one call per
server), relays "BitTorrent keeps failing" to the source as an upload request, ends the entries whose
source file changed (127 on every target), and ends the transfer when every item is final, on timeout,
or on terminate. A pushed file (async_push_file: content from the caller) has no source and no file
server: the task server holding its first target coordinates it and the content rides in the FileTarget
frame. Any task server records the file reports of the agents it holds and acknowledges final ones once
stored. A transfer touching cloud areas runs one swarm per area, joined by the areas' proxies
(area_files.py): each area's members are sent the tracker and direct relay of their own area, and each relay
proxy a RelayTransfer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace

import grpc

from gse.common import dbclient as db
from gse.common.errors import FINAL_STATUSES, ErrorCode, GseError, ScriptStatus
from gse.common.logs import current_trace, trace
from gse.common.peers import Peers
from gse.common.records import FileItem, FileResults, item_name
from gse.common.records.file import PROGRESS
from gse.common.rpc import trace_metadata
from gse.pb import agent_pb2 as apb
from gse.pb import file_pb2 as fpb
from gse.pb import taskserver_pb2 as pb

from .agent_access import AgentAccess, AgentSession
from .area_files import AreaPlan, plan as plan_areas
from .batch_writer import BatchWriter

log = logging.getLogger("gse.taskserver.files")

SETTLE_S = 2.0      # after an early end, items are checked once more this much later (see _settle)


@dataclass
class Transfer:
    """One transfer this task server coordinates: the API's spec, the file server holding it, the members' tokens, the
    tracker URL, the rate cap (bytes/s) and connections per torrent it granted, the deadline (monotonic s), the
    source's manifest entries once known, the entries the source was asked to upload directly, and whether the targets
    were told."""
    spec: pb.TransferSpec
    fileserver: str
    tokens: dict[str, str]
    tracker_url: str
    rate: int
    max_connections: int
    deadline: float
    entries: list = field(default_factory=list)
    source_dir: str = ""
    upload_requested: set[int] = field(default_factory=set)
    targets_sent: bool = False
    plan: AreaPlan | None = None        # the swarms of the areas it touches (None: all of area 0, or crossing)
    request_id: str = ""            # the API request that made it (from the trace of StartTransfer)
    stopped: set[str] = field(default_factory=set)     # targets terminated by request while the others go on

    def trace(self):
        """`with t.trace():` the log lines inside name the transfer's task and request."""
        return trace(task_id=self.spec.task_id, request_id=self.request_id)


class FileCoordinator:
    """Coordinates the transfers whose source this task server holds (and pushes whose first target it holds): see the
    module docstring."""

    def __init__(self, node_id: str, access: AgentAccess, writer: BatchWriter, client: db.DbClient, peers: Peers,
                 ttl_ms: int, direct_max: int, max_file_size: int):
        self.node_id = node_id
        self.access = access
        self.writer = writer
        self.db = client
        self.peers = peers
        self.ttl = ttl_ms
        self.direct_max = direct_max
        self.max_file_size = max_file_size
        self.transfers: dict[str, Transfer] = {}
        self._settling: set[asyncio.Task] = set()

    # ---- sending ----------------------------------------------------------------------------------

    async def _send(self, frame: bytes, by_node: dict[str, list[str]]) -> list[str]:
        """Write `frame` to agents wherever they are attached; returns the agents it could not reach."""
        missed: list[str] = []
        calls = []
        for node, ids in by_node.items():
            if node == self.node_id:
                for aid in ids:
                    s = self.access.sessions.get(aid) or self.access.relays.target(aid)
                    if s is None or s.closed:
                        missed.append(aid)
                    else:
                        s.send(frame)
            else:
                stub = self.peers.task(node)
                if stub is None:
                    missed.extend(ids)
                else:
                    calls.append((ids, stub.Dispatch(pb.DispatchRequest(frame=frame, agent_ids=ids), timeout=10,
                                                     metadata=trace_metadata())))
        for ids, call in calls:
            try:
                reply = await call
                missed.extend(f.agent_id for f in reply.failures)
            except grpc.aio.AioRpcError:
                missed.extend(ids)
        return missed

    def _targets_by_node(self, t: Transfer, only=None) -> dict[str, list[str]]:
        """The targets still in the transfer (of `only`, if given), grouped by the task server holding them."""
        by_node: dict[str, list[str]] = {}
        for aid in t.spec.target_agents:
            if aid not in t.stopped and (only is None or aid in only):
                by_node.setdefault(t.spec.target_nodes.get(aid, ""), []).append(aid)
        return by_node

    def _item(self, t: Transfer, target: str, entry, **kw) -> FileItem:
        spec = t.spec
        dest_name = spec.dest_name if (spec.dest_name and len(t.entries) == 1) else (entry.rel_path if entry else "")
        item = FileItem(mode=1, source_agent_id=spec.source_agent, source_file_dir=t.source_dir or spec.source_dir,
                        source_file_name=entry.rel_path if entry else spec.source_name, dest_agent_id=target,
                        dest_file_dir=spec.dest_dir, dest_file_name=dest_name, progress=0, speed=0,
                        size=entry.size if entry else 0, status=ScriptStatus.DISPATCHED, status_info="", type="",
                        start_time=0, end_time=0, error_code=ErrorCode.RUNNING, error_msg="")
        for k, v in kw.items():
            setattr(item, k, v)
        return item

    async def _write_items(self, t: Transfer, make, progress: bool = False) -> None:
        ops = []
        for target in t.spec.target_agents:
            if progress and target in t.stopped:
                continue                # its outcome is written: terminated by request
            items = {}
            for entry in t.entries or [None]:
                index = entry.index if entry else -1
                items[item_name(t.spec.task_index, index, progress=progress)] = make(target, entry)
            ops.append(FileResults.update(t.spec.task_id, target, items, self.ttl).op())
        for i in range(0, len(ops), 5000):
            await self.db.execute(ops[i:i + 5000])

    # ---- the transfer ------------------------------------------------------------------------------

    async def start(self, spec: pb.TransferSpec) -> list[tuple[str, int, str]]:
        """StartTransfer: create the transfer on the least loaded file server and send FileSource to the source agent
        (a push goes straight to its targets). Returns (bk_agent_id, code, message) failures: 117 when the source is
        not attached here, 65535 when no file server is registered or it refused."""
        if spec.from_caller:
            return await self._start_push(spec)
        source = self.access.sessions.get(spec.source_agent)
        if source is None or source.closed:
            return [(spec.source_agent, ErrorCode.AGENT_OFFLINE, "source agent is not attached to this task server")]
        address = self.peers.pick_fileserver()
        if address is None:
            return [(spec.source_agent, ErrorCode.FAILED, "no file server is registered")]
        members = [spec.source_agent, *spec.target_agents]
        area_plan = None
        if not spec.cross_area:
            try:
                area_plan = await plan_areas(self.db, spec.source_agent, source.cloud_id, list(spec.target_agents),
                                             address, "")
            except GseError as exc:
                return [(spec.source_agent, ErrorCode.FAILED, f"the areas of the targets cannot be read: {exc}")]
            if area_plan is not None:
                members += area_plan.relay_members()
        try:
            reply = await self.peers.file(address).CreateTransfer(fpb.CreateTransferRequest(
                transfer_id=spec.transfer_id, area=spec.area, members=members, timeout_seconds=spec.timeout_seconds,
                max_rate=max(spec.upload_rate, spec.download_rate), cross_area=spec.cross_area,
                member_areas=area_plan.member_areas(spec.source_agent) if area_plan else {},
                uploaders=area_plan.uploaders(spec.source_agent) if area_plan else [spec.source_agent]), timeout=10,
                metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            return [(spec.source_agent, ErrorCode.FAILED, f"file server {address}: {exc.code().name}: {exc.details()}")]
        timeout = spec.timeout_seconds or 3600
        t = Transfer(spec, address, dict(reply.tokens), reply.tracker_url, reply.rate_limit, reply.max_connections,
                     time.monotonic() + timeout, plan=area_plan, request_id=current_trace().get("request_id", ""))
        if area_plan is not None:
            area_plan.fileserver, area_plan.tracker_url = address, reply.tracker_url
        source_fs, source_tracker = area_plan.endpoint(area_plan.source_area) if area_plan else \
            (address, reply.tracker_url)
        self.transfers[spec.transfer_id] = t
        if area_plan is not None and area_plan.relays:
            # Before the source hears of it: a source inside an area uploads its direct entries into its relay
            # (which forwards them up) while it prepares its manifest.
            await self._start_relays(t)
        source.send(apb.ServerFrame(file_source=apb.FileSource(
            task_id=spec.task_id, transfer_id=spec.transfer_id, store_dir=spec.source_dir,
            file_name=spec.source_name, md5=spec.md5, user=spec.source_user, fileserver=source_fs,
            token=t.tokens[spec.source_agent], tracker_url=source_tracker, direct_max=self.direct_max,
            max_file_size=self.max_file_size, upload_rate=_cap(spec.upload_rate, t.rate),
            timeout_seconds=spec.timeout_seconds, keep_seeding=spec.keep_seeding,
            targets=len(spec.target_agents), coordinator=self.node_id,
            request_id=t.request_id)).SerializeToString())
        log.info("transfer started", extra={"transfer_id": spec.transfer_id, "targets": len(spec.target_agents),
                                            "fileserver": address})
        return []

    async def on_manifest(self, session: AgentSession, m: apb.FileManifest) -> None:
        """The `file_manifest` frame handler (from the source only): register the torrents, write every target's items
        and send FileTarget; a manifest with an error, or torrents the file server refused, ends the transfer with
        that error on every target."""
        t = self.transfers.get(m.transfer_id)
        if t is None or session.agent_id != t.spec.source_agent:
            return
        with t.trace():
            log.info("source manifest", extra={"transfer_id": m.transfer_id, "entries": len(m.entries),
                                               "torrents": sum(1 for e in m.entries if e.torrent),
                                               "bytes": sum(e.size for e in m.entries), "error_code": m.error_code})
            await self._on_manifest(session, t, m)

    async def _on_manifest(self, session: AgentSession, t: Transfer, m: apb.FileManifest) -> None:
        now = int(time.time() * 1000)
        if m.error_code:
            await self._write_items(t, lambda target, e: self._item(t, target, e))
            await self._write_items(t, lambda target, e: self._item(
                t, target, e, status=ScriptStatus.FAILED, error_code=m.error_code, error_msg=m.error_msg, end_time=now),
                progress=True)
            await self.end(t, terminated=True)
            return
        t.entries = list(m.entries)
        t.source_dir = m.source_dir
        hashes = [e.info_hash for e in t.entries if e.torrent]
        try:
            if hashes:
                await self.peers.file(t.fileserver).AddTorrents(
                    fpb.AddTorrentsRequest(transfer_id=t.spec.transfer_id, info_hashes=hashes), timeout=10,
                    metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            why = f"file server refused the torrents: {exc.details()}"
            await self._write_items(t, lambda target, e: self._item(t, target, e))
            await self._write_items(t, lambda target, e: self._item(
                t, target, e, status=ScriptStatus.FAILED, error_code=ErrorCode.FAILED,
                error_msg=why, end_time=now), progress=True)
            await self.end(t, terminated=True)
            return
        await self._write_items(t, lambda target, e: self._item(t, target, e))
        if t.plan is not None:
            await self._start_relays(t)
        if hashes:
            # The source seeds before the tracker knows its torrents, so its first announce is refused: ask it
            # to announce again now that they are registered.
            session.send(apb.ServerFrame(upload_request=apb.UploadRequest(
                transfer_id=t.spec.transfer_id, announce=True)).SerializeToString())
        await self._send_targets(t)

    async def _start_push(self, spec: pb.TransferSpec) -> list[tuple[str, int, str]]:
        """A file whose content the caller gave (async_push_file): one entry, delivered in the FileTarget
        frame itself; no source agent, no file server."""
        timeout = spec.timeout_seconds or 3600
        t = Transfer(spec, "", {}, "", 0, 0, time.monotonic() + timeout,
                     request_id=current_trace().get("request_id", ""))
        t.entries = [apb.FileEntry(index=0, rel_path=spec.dest_name, size=len(spec.content),
                                   mode=_mode(spec.permission) or 0o644, content=spec.content,
                                   md5=spec.md5 or hashlib.md5(spec.content).hexdigest())]
        t.source_dir = spec.source_dir
        self.transfers[spec.transfer_id] = t
        await self._write_items(t, lambda target, e: self._item(t, target, e))
        await self._send_targets(t)
        log.info("push started", extra={"transfer_id": spec.transfer_id, "targets": len(spec.target_agents)})
        return []

    async def _start_relays(self, t: Transfer) -> None:
        """Tell each area's relay proxy its part (area_files.py): once when the transfer starts (its members,
        tokens and uploaders: the relays on the source's way take its uploads from then on), and again with the
        source's entries once its manifest is in. The targets behind a relay that cannot be reached cannot be
        reached either."""
        p, spec = t.plan, t.spec
        by_node: dict[str, list[str]] = {}
        frames = {}
        uploaders = p.uploaders(spec.source_agent)
        for area, rec in p.relays.items():
            up_fs, up_tracker = p.upstream(area)
            swarm = p.swarm_members(area, spec.source_agent, list(spec.target_agents))
            frames[area] = apb.ServerFrame(relay_transfer=apb.RelayTransfer(
                transfer_id=spec.transfer_id, task_id=spec.task_id, area=area, member=p.member(rec.node_id),
                members={m: t.tokens[m] for m in swarm if m in t.tokens}, entries=t.entries,
                upstream_fileserver=up_fs, upstream_tracker_url=up_tracker, timeout_seconds=spec.timeout_seconds,
                rate=t.rate, max_connections=t.max_connections, source_inside=p.on_source_way(area),
                uploaders=[m for m in uploaders if m in swarm])).SerializeToString()
            by_node.setdefault(rec.node, []).append(p.member(rec.node_id))
        missed: set[str] = set()
        for area, frame in frames.items():
            rec = p.relays[area]
            missed.update(await self._send(frame, {rec.node: [p.member(rec.node_id)]}))
        lost_areas = {a for a, r in p.relays.items() if p.member(r.node_id) in missed}
        for target in spec.target_agents:
            if target not in p.unreachable:
                way = [a for a in p.relays if p.relays[a].node_id in p.route(target)]
                if set(way) & lost_areas:
                    p.unreachable[target] = f"the proxy relaying into area {sorted(set(way) & lost_areas)[0]} " \
                                            f"is not reachable now"
        log.info("relays started", extra={"transfer_id": spec.transfer_id,
                                          "relays": {a: r.node_id for a, r in p.relays.items()},
                                          "unreached": len(missed)})

    async def _send_targets(self, t: Transfer) -> None:
        """One FileTarget frame per run-as user (and area) to every target, wherever it is attached; the
        unreachable ones are answered 117 at once (65535 when no proxy can relay the file into their area)."""
        now = int(time.time() * 1000)
        spec = t.spec
        # Targets terminated before they were told are told nothing; their entries end as terminated.
        await self._fail_targets(t, {a: (ErrorCode.TERMINATED, "terminated") for a in t.stopped}, now,
                                 ScriptStatus.STOPPED)
        if t.plan is not None:
            await self._send_area_targets(t, now)
            return
        # The targets' tokens only: the source's would let a target upload what the others receive (a push has
        # no tokens at all).
        target_tokens = {a: t.tokens[a] for a in spec.target_agents if a in t.tokens and a not in t.stopped}
        frame = apb.ServerFrame(file_target=apb.FileTarget(
            task_id=spec.task_id, transfer_id=spec.transfer_id, coordinator=self.node_id, dest_dir=spec.dest_dir,
            dest_name=spec.dest_name, owner=spec.owner, permission=spec.permission, auto_mkdir=spec.auto_mkdir,
            entries=t.entries, fileserver=t.fileserver, tracker_url=t.tracker_url, tokens=target_tokens,
            download_rate=_cap(spec.download_rate, t.rate), upload_rate=_cap(spec.upload_rate, t.rate),
            timeout_seconds=spec.timeout_seconds, source_agent_id=spec.source_agent, source_dir=t.source_dir,
            max_connections=t.max_connections, task_index=spec.task_index, request_id=t.request_id)).SerializeToString()
        users = dict(zip(spec.target_agents, spec.target_users))
        by_user_node: dict[str, dict[str, list[str]]] = {}
        for node, ids in self._targets_by_node(t).items():
            for aid in ids:
                by_user_node.setdefault(users.get(aid, "root"), {}).setdefault(node, []).append(aid)
        missed = []
        for user, by_node in by_user_node.items():
            f = apb.ServerFrame.FromString(frame)
            f.file_target.user = user
            missed += await self._send(f.SerializeToString(), by_node)
        t.targets_sent = True
        log.info("targets told", extra={"transfer_id": spec.transfer_id, "targets": len(spec.target_agents),
                                        "not_attached": len(missed)})
        await self._fail_targets(t, {aid: (ErrorCode.AGENT_OFFLINE, "agent is offline") for aid in missed}, now)

    async def _fail_targets(self, t: Transfer, why: dict[str, tuple[int, str]], now: int,
                            status: int = ScriptStatus.FAILED) -> None:
        """End every entry of the targets of `why` (target -> (code, message)) with that outcome."""
        if not why:
            return
        spec = t.spec
        ops = [FileResults.update(spec.task_id, aid, {
            item_name(spec.task_index, e.index, progress=True): self._item(
                t, aid, e, status=status, error_code=code, error_msg=msg, end_time=now)
            for e in t.entries}, self.ttl).op() for aid, (code, msg) in why.items()]
        await self.db.execute(ops)

    async def _send_area_targets(self, t: Transfer, now: int) -> None:
        """FileTarget frames per area swarm: each names the tracker and direct relay of its area and the
        tokens of that swarm's targets only (they share the pieces out among themselves, area_files.py)."""
        p, spec = t.plan, t.spec
        users = dict(zip(spec.target_agents, spec.target_users))
        groups: dict[tuple[int, str], dict[str, list[str]]] = {}
        for node, ids in self._targets_by_node(t).items():
            for aid in ids:
                if aid not in p.unreachable:
                    key = (p.target_area.get(aid, 0), users.get(aid, "root"))
                    groups.setdefault(key, {}).setdefault(node, []).append(aid)
        missed: list[str] = []
        for (area, user), by_node in groups.items():
            fileserver, tracker_url = p.endpoint(area)
            swarm = [a for ids in by_node.values() for a in ids]
            swarm_all = [a for a in spec.target_agents if p.target_area.get(a, 0) == area and a not in p.unreachable
                         and a not in t.stopped]
            frame = apb.ServerFrame(file_target=apb.FileTarget(
                task_id=spec.task_id, transfer_id=spec.transfer_id, coordinator=self.node_id, dest_dir=spec.dest_dir,
                dest_name=spec.dest_name, owner=spec.owner, permission=spec.permission, auto_mkdir=spec.auto_mkdir,
                entries=t.entries, fileserver=fileserver, tracker_url=tracker_url,
                tokens={a: t.tokens[a] for a in swarm_all}, download_rate=_cap(spec.download_rate, t.rate),
                upload_rate=_cap(spec.upload_rate, t.rate), timeout_seconds=spec.timeout_seconds,
                source_agent_id=spec.source_agent, source_dir=t.source_dir, max_connections=t.max_connections,
                task_index=spec.task_index, user=user, request_id=t.request_id)).SerializeToString()
            missed += await self._send(frame, by_node)
            log.info("targets sent", extra={"transfer_id": spec.transfer_id, "area": area, "targets": len(swarm),
                                            "via": " > ".join(p.route(swarm[0])) if swarm else ""})
        t.targets_sent = True
        why = {aid: (ErrorCode.AGENT_OFFLINE, "agent is offline") for aid in missed}
        why.update({aid: (ErrorCode.FAILED, msg) for aid, msg in p.unreachable.items()})
        await self._fail_targets(t, why, now)

    def on_need_direct(self, transfer_id: str, index: int) -> bool:
        """NeedDirect: a target's BitTorrent keeps failing for entry `index`, so the source is asked (once per entry)
        to upload it to the file server. False when the transfer is not coordinated here, or when the source is not
        attached (then a later request for the entry asks again)."""
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        with t.trace():
            return self._need_direct(t, transfer_id, index)

    def _need_direct(self, t: Transfer, transfer_id: str, index: int) -> bool:
        if index not in t.upload_requested:
            s = self.access.sessions.get(t.spec.source_agent)
            if s is None:
                return False        # not marked: the next NeedDirect asks again (the source may be back)
            t.upload_requested.add(index)
            s.send(apb.ServerFrame(upload_request=apb.UploadRequest(
                transfer_id=transfer_id, indexes=[index])).SerializeToString())
            log.info("direct mode requested", extra={"transfer_id": transfer_id, "index": index})
        return True

    async def on_source_changed(self, transfer_id: str, index: int, message: str) -> bool:
        """The source's file of entry `index` changed mid-transfer: every target's item of that entry ends
        with 127 (the message names the file) and the targets stop fetching it; the other entries go on."""
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        with t.trace():
            log.warning("source changed; ending its entry", extra={"transfer_id": transfer_id, "index": index})
            frame = apb.ServerFrame(end_entry=apb.EndEntry(transfer_id=transfer_id, index=index,
                                                           error_code=ErrorCode.CHECKSUM, error_msg=message))
            await self._send(frame.SerializeToString(), self._targets_by_node(t))
            await self._finish_open_items(t, ScriptStatus.FAILED, ErrorCode.CHECKSUM, message, index=index)
        return True

    async def end(self, t: Transfer, terminated: bool) -> None:
        """End the transfer: EndTransfer to its targets and source (`terminated` tells them to stop), and to the file
        server."""
        self.transfers.pop(t.spec.transfer_id, None)
        frame = apb.ServerFrame(end_transfer=apb.EndTransfer(
            transfer_id=t.spec.transfer_id, task_id=t.spec.task_id, terminated=terminated)).SerializeToString()
        by_node = self._targets_by_node(t)
        if t.spec.source_agent:
            by_node.setdefault(self.node_id, []).append(t.spec.source_agent)
        if t.plan is not None:          # the relays drop the transfer too (they keep the file in their cache)
            for rec in t.plan.relays.values():
                by_node.setdefault(rec.node, []).append(t.plan.member(rec.node_id))
        await self._send(frame, by_node)
        if t.fileserver:
            try:
                await self.peers.file(t.fileserver).EndTransfer(
                    fpb.EndTransferRequest(transfer_id=t.spec.transfer_id), timeout=10, metadata=trace_metadata())
            except grpc.aio.AioRpcError as exc:
                log.warning("file server did not end the transfer", extra={"error": exc.code().name})
        log.info("transfer ended", extra={"transfer_id": t.spec.transfer_id, "terminated": terminated})

    async def terminate(self, transfer_id: str, agents=()) -> bool:
        """TerminateTransfer (async_terminate_transfer_file, spec §4). With no `agents` (bk_agent_ids), or when they
        name the source or every target, the whole transfer: items not final end with STOPPED/126, the transfer
        ends, and the items are settled once more SETTLE_S later. Otherwise only the targets named: their items
        not final end with STOPPED/126, they are sent EndTransfer (terminated: the download stops and its partial
        files go) and are settled later, and the other targets carry on; agents not in the transfer are ignored.
        False when the transfer is not coordinated here."""
        t = self.transfers.get(transfer_id)
        if t is None:
            return False
        named = set(agents)
        targets = set(t.spec.target_agents)
        # In the trace of the terminate request (TerminateTransfer's metadata).
        if named and t.spec.source_agent not in named and not targets <= named:
            only = [a for a in t.spec.target_agents if a in named and a not in t.stopped]
            log.info("targets terminated by request", extra={"transfer_id": transfer_id, "targets": len(only)})
            if only:
                by_node = self._targets_by_node(t, set(only))
                t.stopped.update(only)
                await self._finish_open_items(t, ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated", targets=only)
                frame = apb.ServerFrame(end_transfer=apb.EndTransfer(
                    transfer_id=transfer_id, task_id=t.spec.task_id, terminated=True)).SerializeToString()
                await self._send(frame, by_node)
                self._settle(t, ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated", targets=only)
            return True
        log.info("transfer terminated by request", extra={"transfer_id": transfer_id})
        await self._finish_open_items(t, ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated")
        await self.end(t, terminated=True)
        self._settle(t, ScriptStatus.STOPPED, ErrorCode.TERMINATED, "terminated")
        return True

    def _settle(self, t: Transfer, status: int, code: int, message: str, targets: list[str] | None = None) -> None:
        """Once more, SETTLE_S after a transfer (or `targets` of it) ended early: a progress report an agent sent
        just before it heard of the end may be stored (by whichever task server holds it, batched) after the
        outcome was written; an item it left running gets the outcome again."""
        async def again() -> None:
            """Write the outcome once more over items still open."""
            await asyncio.sleep(SETTLE_S)
            try:
                await self._finish_open_items(t, status, code, message, targets=targets)
            except Exception:  # noqa: BLE001 - best effort; the items were written once already
                log.exception("settling a transfer's items failed", extra={"transfer_id": t.spec.transfer_id})
        task = asyncio.ensure_future(again())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _finish_open_items(self, t: Transfer, status: int, code: int, message: str,
                                 index: int | None = None, targets: list[str] | None = None) -> None:
        """Items not final yet (of entry `index` only, and of `targets` only, if given) end with `code` (timeout,
        terminate, a changed source)."""
        targets = list(t.spec.target_agents) if targets is None else targets
        res = await self.db.execute([FileResults.read(t.spec.task_id, a) for a in targets])
        now = int(time.time() * 1000)
        ops = []
        for target, r in zip(targets, res):
            items = {}
            for name, item in FileResults.decode(r, t.spec.task_index).items():
                if index is not None and name != item_name(t.spec.task_index, index):
                    continue
                if item.status not in FINAL_STATUSES:
                    items[PROGRESS + name] = replace(item, status=status, error_code=code, error_msg=message,
                                                     end_time=now)
            if items:
                ops.append(FileResults.update(t.spec.task_id, target, items, self.ttl).op())
        if ops:
            await self.db.execute(ops)

    async def monitor(self, interval: float = 1.0) -> None:
        """End transfers whose items are all final, and those past their timeout."""
        while True:
            await asyncio.sleep(interval)
            for t in list(self.transfers.values()):
                with t.trace():
                    try:
                        await self._check(t)
                    except Exception:  # noqa: BLE001 - one transfer's trouble must not stop the others
                        log.exception("transfer check failed", extra={"transfer_id": t.spec.transfer_id})

    async def _check(self, t: Transfer) -> None:
        if time.monotonic() > t.deadline:
            log.warning("transfer timed out", extra={"transfer_id": t.spec.transfer_id})
            await self._finish_open_items(t, ScriptStatus.TIMEOUT, ErrorCode.TIMEOUT, "transfer timed out")
            await self.end(t, terminated=True)
            self._settle(t, ScriptStatus.TIMEOUT, ErrorCode.TIMEOUT, "transfer timed out")
            return
        if not t.targets_sent:
            return
        res = await self.db.execute([FileResults.read(t.spec.task_id, a) for a in t.spec.target_agents])
        for r in res:
            items = [i for n, i in FileResults.decode(r, t.spec.task_index).items() if not n.endswith(":up")]
            if not items or any(i.status not in FINAL_STATUSES for i in items):
                return
        await self.end(t, terminated=False)


class FileReports:
    """Records the file reports of the agents this task server holds."""

    def __init__(self, writer: BatchWriter, ttl_ms: int, acks):
        self.writer = writer
        self.ttl = ttl_ms
        self.acks = acks            # tasks.AckBatcher: final reports are acknowledged once stored

    def on_report(self, session: AgentSession, report: apb.FileReport) -> None:
        """The `file_report` frame handler: store each item's progress document ("p:<ti>:<i>", ":up" for the source's
        upload item) through the batch writer; final ones are acknowledged once stored."""
        finals = []
        by_task: dict[str, dict[str, FileItem]] = {}
        for p in report.items:
            item = FileItem(mode=p.mode, progress=p.progress, speed=p.speed, size=p.size, status=p.status,
                            status_info="", type=p.type, start_time=p.start_time_ms, end_time=p.end_time_ms,
                            error_code=p.error_code, error_msg=p.error_msg, dest_path=p.dest_path,
                            source_path=p.source_path)
            name = item_name(p.task_index, p.index, progress=True, upload=p.mode != 1)
            by_task.setdefault(p.task_id, {})[name] = item
            if p.final:
                finals.append(apb.ItemRef(task_id=f"file:{p.transfer_id}", atomic_task_id=p.index))
        for task_id, items in by_task.items():
            self.writer.put(FileResults.update(task_id, session.agent_id, items, self.ttl))
        if finals:
            self.acks.when_stored(session, finals)


def _mode(digits: int) -> int:
    """chmod digits as written (644) -> the mode (0o644); 0 stays 0. The API server has checked them."""
    return int(str(digits), 8) if digits else 0


def _cap(requested: int, cap: int) -> int:
    caps = [r for r in (requested, cap) if r > 0]
    return min(caps) if caps else 0

