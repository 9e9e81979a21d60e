#!/bin/sh
# Stream admission at 10,000 streams on one server (the probe note's "4,300 handlers" puzzle): 5 client
# processes x 2,000 channels, each channel its own connection. One JSON line per experiment; "trace" holds
# (seconds, handlers started, sessions) samples, client_last each process's counters and errors by status.
#   sh bench/probes/matrix_attach.sh > /tmp/attach.jsonl ; ONLY=<label substring> to run a subset.
# The *-fast runs ramp at 2,500 new channels/s overall (what the probe note and simagents' default do); the
# others at 1,000/s. Clients retry a failed stream after 0.5-2 s (no backoff: a storm, on purpose).
PY=${PY:-/work/main/.venv/bin/python}
R="$PY $(dirname "$0")/run_probe.py --n ${N:-10000} --procs ${PROCS:-5} --settle 2 --window 0 --stall-s 45 --attach-timeout 150"
run() { label=$1; shift; case "$label" in *"${ONLY:-}"*) $R --label "$label" "$@";; esac; }
run nohello-plain-shared  --client-arg=--no-hello --client-arg=--shared-connection --client-arg=--ramp-pause=0.1 -- --handler queue --plain
run hello-plain-shared    --client-arg=--shared-connection --client-arg=--ramp-pause=0.1 -- --handler queue --plain
run hello-tls-fast        --client-arg=--ramp-pause=0.1  -- --handler queue
run nohello-plain         --client-arg=--no-hello --client-arg=--ramp-pause=0.25 -- --handler queue --plain
run nohello-tls           --client-arg=--no-hello --client-arg=--ramp-pause=0.25 -- --handler queue
run hello-tls             --client-arg=--ramp-pause=0.25 -- --handler queue
