#!/bin/sh
# Heartbeat CPU: back-to-back runs (2,000 mutual-TLS streams, 2 client processes, 1,000 messages/s) to compare
# per-message server CPU: BDP probing off, handler structure, plaintext, and liveness from HTTP/2 keepalive
# pings instead of heartbeats (clients ping every 2 s, no heartbeat messages).
#   sh bench/probes/matrix_cpu.sh > /tmp/cpu.jsonl ; ONLY=<label substring> to run a subset.
PY=${PY:-/work/main/.venv/bin/python}
R="$PY $(dirname "$0")/run_probe.py --n ${N:-2000} --procs ${PROCS:-2} --hb 2 --settle 6 --window 20"
run() { label=$1; shift; case "$label" in *"${ONLY:-}"*) $R --label "$label" "$@";; esac; }
run cpu-base          -- --handler queue
run cpu-bdp0          -- --handler queue --opt grpc.http2.bdp_probe=0
run cpu-bdp0-both     --client-arg=--opt=grpc.http2.bdp_probe=0 -- --handler queue --opt grpc.http2.bdp_probe=0
run cpu-rw-bdp0       -- --handler rw --opt grpc.http2.bdp_probe=0
run cpu-plain-bdp0    -- --handler queue --plain --opt grpc.http2.bdp_probe=0
run cpu-idle          --client-arg=--no-heartbeat -- --handler queue
run cpu-ping2s        --client-arg=--no-heartbeat --client-arg=--opt=grpc.keepalive_time_ms=2000 -- --handler queue --opt grpc.http2.min_ping_interval_without_data_ms=1000
