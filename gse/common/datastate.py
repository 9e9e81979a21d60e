"""Where the data path keeps its definitions and state, shared by the agent, the data server and the API.

ZooKeeper (source of truth for routing; data servers apply changes live):
  <root>/config/data/streamto/<stream_to_id>   JSON: one output definition (Kafka cluster, Redis, file dir)
  <root>/config/data/route/<channel_id>        JSON: the route of one channel (DataID): outputs and filters
  <root>/config/data/seq/                      sequential nodes that allocate stream_to and channel ids
  <root>/config/message_slots                  JSON: slot_id -> {callback_url, token, plugin_name} for
                                               cluster/dispatch_message replies
  <root>/dataserver/<node-id>                  ephemeral: address and load of one data server

Redis (through dbproxy): the latest host snapshot of each agent (gse.common.records.HostSnapshotRecord).

Reserved channel ids: GSE's own records travel on channels no plugin should use. Channel ids the API
allocates start at CHANNEL_ALLOC_BASE.
"""

from __future__ import annotations

# The agent's host snapshot, every 60 s (also cached for list_agent_info).
CHANNEL_HOST_SNAPSHOT = 1999001
# A data server's own operating figures, every minute (what the original called DataOpServer).
CHANNEL_DATASERVER_OPS = 1999002
CHANNEL_ALLOC_BASE = 2000000
MAX_CHANNEL_ID = 2**32 - 1

DATA_CONFIG = "data"            # under <root>/config
STREAMTO_DIR = "streamto"
ROUTE_DIR = "route"
SEQ_DIR = "seq"
MESSAGE_SLOTS = "message_slots"

DEFAULT_DATASERVER_PORT = 58625

# gRPC metadata with which an agent names itself on the data stream.
MD_AGENT_ID = "x-gse-agent-id"
MD_CLOUD_ID = "x-gse-cloud-id"
MD_IP = "x-gse-ip"

STREAM_METHOD = "/gse.pb.DataIngest/Stream"
