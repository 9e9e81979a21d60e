#!/bin/sh
# Memory/CPU matrix: one run_probe.py experiment per line (2,000 mutual-TLS streams, 2 client processes,
# heartbeat every 2 s so the CPU window sees 1,000 heartbeats/s). Output: one JSON line per experiment.
#   sh bench/probes/matrix_memory.sh > /tmp/matrix.jsonl
# Set ONLY=<label substring> to run a subset.
PY=${PY:-/work/main/.venv/bin/python}
R="$PY $(dirname "$0")/run_probe.py --n ${N:-2000} --procs ${PROCS:-2} --hb 2 --settle 6 --window 15"
run() { label=$1; shift; case "$label" in *"${ONLY:-}"*) $R --label "$label" "$@";; esac; }
run base-queue                                    -- --handler queue
run base-rw                                       -- --handler rw
run plain-queue                                   -- --handler queue --plain
run plain-rw                                      -- --handler rw --plain
run arena2-queue      --arena 2                   -- --handler queue
run bdp0              -- --handler queue --opt grpc.http2.bdp_probe=0
run lookahead16k      -- --handler queue --opt grpc.http2.lookahead_bytes=16384
run maxframe16k       -- --handler queue --opt grpc.http2.max_frame_size=16384
run readchunk         -- --handler queue --opt grpc.experimental.tcp_read_chunk_size=2048 --opt grpc.experimental.tcp_min_read_chunk_size=256 --opt grpc.experimental.tcp_max_read_chunk_size=8192
run writebuf8k        -- --handler queue --opt grpc.http2.write_buffer_size=8192
run maxrecv64k        -- --handler queue --opt grpc.max_receive_message_length=65536
run maxstreams1       -- --handler queue --opt grpc.max_concurrent_streams=1
run hpack0            -- --handler queue --opt grpc.http2.hpack_table_size.decoder=0 --opt grpc.http2.hpack_table_size.encoder=0
run nokeepalive       -- --handler queue --no-base-opts
run tracemalloc-queue -- --handler queue --tracemalloc
run tracemalloc-rw    -- --handler rw --tracemalloc
run tsi4k             -- --handler queue --opt grpc.tsi.max_frame_size=4096
run tsi1k             -- --handler queue --opt grpc.tsi.max_frame_size=1024
run tsi4k-rw          -- --handler rw --opt grpc.tsi.max_frame_size=4096
run tsi4k-bothsides   --client-arg=--opt=grpc.tsi.max_frame_size=4096 -- --handler queue --opt grpc.tsi.max_frame_size=4096
run trim-queue        --trim -- --handler queue
run jemalloc          --trim --env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 -- --handler queue
run best-tls          --env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 -- --handler rw --opt grpc.tsi.max_frame_size=4096
