#!/bin/sh
# Broadcast: one pre-serialized 60-byte TaskRequest frame to every held stream (mutual TLS, heartbeat 10 s),
# each agent answering with a TaskReport; 3 rounds per run. Reports per round the time to hand the frame to
# every session, the time until every report is back, and server CPU per target; for the rw handler also a
# "direct" round set (asyncio.gather of context.write) timing the writes alone.
#   sh bench/probes/matrix_bcast.sh > /tmp/bcast.jsonl ; ONLY=<label substring> to run a subset.
PY=${PY:-/work/main/.venv/bin/python}
R="$PY $(dirname "$0")/run_probe.py --n ${N:-6000} --procs ${PROCS:-3} --hb 10 --settle 5 --window 10 --bcast 3"
run() { label=$1; shift; case "$label" in *"${ONLY:-}"*) $R --label "$label" "$@";; esac; }
run bcast-queue  --client-arg=--ramp-pause=0.25 -- --handler queue --opt grpc.http2.bdp_probe=0
run bcast-rw     --client-arg=--ramp-pause=0.25 -- --handler rw --opt grpc.http2.bdp_probe=0
