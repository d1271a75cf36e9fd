#!/usr/bin/env bash
# A Ray cluster of separate processes on this machine, addressed on loopback: start a head node, submit a
# harvest of the built-in sample corpus with a tiny model as a Ray job, print its logs, stop the head.
#
#   clusters/local.sh                       # from anywhere; runs in the repository root
#   clusters/local.sh --actors 2            # extra arguments are appended to `lsn harvest`
#   LSN_RAY_PORT=6380 LSN_DASHBOARD_PORT=8266 clusters/local.sh   # if 6379/8265 are taken
#   LSN_STORE=/tmp/other/store clusters/local.sh
#
# Needs `ray[default]` (the dashboard, whose job server answers `ray job submit`, is in that extra);
# this package's dependencies include it. Running it twice resumes: finished shards are skipped.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
# `ray start` passes its PATH on to the job, whose entrypoint `lsn` must be found on it.
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi
command -v ray >/dev/null || { echo "local.sh: ray not found (run 'make install')" >&2; exit 2; }
command -v lsn >/dev/null || { echo "local.sh: lsn not found (run 'make install')" >&2; exit 2; }

HOST=127.0.0.1                       # every address this script names is loopback (see the token below)
GCS_PORT=${LSN_RAY_PORT:-6379}
DASHBOARD_PORT=${LSN_DASHBOARD_PORT:-8265}
DASHBOARD="http://$HOST:$DASHBOARD_PORT"
# The head's dashboard agent runs the job; its HTTP port defaults to 52365, which any other Ray instance
# on this machine (an embedded `lsn harvest`, a test) may hold already. Take a free one instead.
AGENT_PORT=${LSN_DASHBOARD_AGENT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
STORE=${LSN_STORE:-$ROOT/runs/cluster-demo/store}
JOB_ID="lsn-demo-$(date +%Y%m%d-%H%M%S)-$$"
# A private Ray temp dir: `ray start` records its address there, not in /tmp/ray, so an unrelated
# `ray.init()` on this machine (the embedded mode of `lsn harvest`, tests) does not join this cluster.
RAY_TMP=$(mktemp -d /tmp/lsnray.XXXXXX)
HEAD_PID=""
# Ray rewrites a loopback --node-ip-address to the machine's network address unless it runs as on a
# laptop, single-node (this variable): then every server it starts is reached on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token authentication with a token of this run only: the GCS still listens on all interfaces, so the
# token, not the address, is what keeps other machines out. The head, the `ray job` commands and the job itself
# (which inherits the head's environment) all read it from these two variables.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$RAY_TMP/auth_token"
(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH")

stop_head() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$HEAD_PID" ]] && kill -0 "$HEAD_PID" 2>/dev/null; then
        echo "local.sh: stopping the Ray head (pid $HEAD_PID)" >&2
        # `ray start --block` shuts down the processes it started when it gets SIGTERM (after draining
        # running work for up to 30 s). Not `ray stop`: that would stop every Ray instance this user
        # runs on the machine.
        kill -TERM "$HEAD_PID" 2>/dev/null || true
        for _ in $(seq 45); do
            kill -0 "$HEAD_PID" 2>/dev/null || break
            sleep 1
        done
        kill -KILL "$HEAD_PID" 2>/dev/null || true
        wait "$HEAD_PID" 2>/dev/null || true
    fi
    rm -rf "$RAY_TMP"
    exit "$rc"
}
trap stop_head EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "local.sh: starting a Ray head on $HOST:$GCS_PORT, dashboard $DASHBOARD" >&2
ray start --head --block \
    --node-ip-address="$HOST" --port="$GCS_PORT" --num-cpus=2 \
    --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
    --disable-usage-stats --temp-dir="$RAY_TMP" >"$RAY_TMP/head.log" 2>&1 &
HEAD_PID=$!

# Wait for the job server (part of the dashboard) to answer.
for i in $(seq 90); do
    if ! kill -0 "$HEAD_PID" 2>/dev/null; then
        echo "local.sh: the Ray head exited; its output:" >&2
        cat "$RAY_TMP/head.log" >&2
        exit 1
    fi
    ray job list --address "$DASHBOARD" >"$RAY_TMP/probe.log" 2>&1 && break
    if [[ $i -eq 90 ]]; then
        echo "local.sh: no job server at $DASHBOARD (is ray[default] installed?); last answer:" >&2
        tail -n 5 "$RAY_TMP/probe.log" >&2
        exit 1
    fi
    sleep 1
done

# --working-dir . uploads the repository (without .gitignore'd paths such as .venv/ and runs/); the
# store path is absolute, because the job runs in its own copy of that directory.
# The job server answers before the head's agent has registered ("No available agent to submit job"):
# retry that one error for a while.
for i in $(seq 30); do
    if ray job submit --address "$DASHBOARD" --submission-id "$JOB_ID" --no-wait --working-dir . -- \
        lsn harvest --model tiny:llama --corpus sample --store "$STORE" --no-progress "$@" \
        >"$RAY_TMP/submit.log" 2>&1; then
        grep -v -e 'Ignoring upload' -e 'ignored by default' "$RAY_TMP/submit.log" >&2 || true
        break
    fi
    if [[ $i -eq 30 ]] || ! grep -q "No available agent" "$RAY_TMP/submit.log"; then
        cat "$RAY_TMP/submit.log" >&2
        exit 1
    fi
    sleep 2
done

# Stream the job's output until it ends, then report its final status. (In the background and waited
# for, so that a SIGTERM to this script stops the cluster at once rather than when the job ends.)
ray job logs --address "$DASHBOARD" --follow "$JOB_ID" &
wait $! || true
STATUS=""
for _ in $(seq 60); do
    STATUS=$(ray job status --address "$DASHBOARD" "$JOB_ID" 2>&1 || true)
    grep -qiE 'succeeded|failed|stopped' <<<"$STATUS" && break
    sleep 2
done
echo "$STATUS" >&2
if grep -qi succeeded <<<"$STATUS"; then
    echo "local.sh: done; the store is $STORE" >&2
else
    echo "local.sh: job $JOB_ID did not succeed" >&2
    exit 1
fi
