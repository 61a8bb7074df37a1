#!/usr/bin/env bash
# A Docker engine for the image lane: `start` uses the running one, or installs Debian's
# docker.io when missing and starts dockerd (recording that it did); `stop` stops only an
# engine that `start` started. Prints nothing on stdout but the docker client to use.
#
# `running` exits 0 when an engine answers already: callers that must leave a running engine
# alone check it before `start`, and call `stop` only when it did not.
#
# Usage: images/engine.sh start|stop|running
set -euo pipefail

state=${KUBEFORGE_IMAGES_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeforge/engine}
mkdir -p "$state"
log() { printf 'engine: %s\n' "$*" >&2; }
die() { printf 'engine: ERROR: %s\n' "$*" >&2; exit 1; }

# Debian's client speaks BuildKit by itself; a newer client without the buildx plugin does not.
client() {
    if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
        command -v docker
    elif [ -x /usr/bin/docker ]; then
        echo /usr/bin/docker
    else
        command -v docker || true
    fi
}

start() {
    local docker
    docker=$(client)
    if [ -n "$docker" ] && "$docker" info >/dev/null 2>&1; then
        log "using the running engine"
        echo "$docker"
        return
    fi
    if ! command -v dockerd >/dev/null; then
        [ "$(id -u)" = 0 ] || die "no Docker engine, and installing one needs root"
        log "installing Debian's docker.io ..."
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq docker.io >/dev/null; } \
            || die "apt-get install docker.io failed"
    fi
    docker=$(client)
    log "starting dockerd (log: $state/dockerd.log) ..."
    dockerd >"$state/dockerd.log" 2>&1 &
    echo $! >"$state/dockerd.pid"
    for _ in $(seq 1 120); do
        if "$docker" info >/dev/null 2>&1; then
            echo "$docker"
            return
        fi
        kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null \
            || die "dockerd exited: $(tail -5 "$state/dockerd.log")"
        sleep 0.5
    done
    die "dockerd did not answer within 60 s: $(tail -5 "$state/dockerd.log")"
}

stop() {
    [ -f "$state/dockerd.pid" ] || return 0
    local pid
    pid=$(cat "$state/dockerd.pid")
    rm -f "$state/dockerd.pid"
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping the dockerd it started (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
}

running() {
    local docker
    docker=$(client)
    [ -n "$docker" ] && "$docker" info >/dev/null 2>&1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    running) running ;;
    *) die "usage: $0 start|stop|running" ;;
esac
