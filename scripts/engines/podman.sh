# shellcheck shell=bash
# podman's Docker-compatible Engine API (v1.41) for scripts/services, on the unix socket
# $TRELLIS_SERVICES_HOME/podman/podman.sock (no TCP port: nothing listens beyond this machine).
#
# Installed from Debian (apt-get install podman; the package brings runc, conmon and the
# network plugins). `podman system service --time=0` serves the API with the settings of
# $TRELLIS_SERVICES_HOME/podman/containers.conf, passed through CONTAINERS_CONF so the
# machine's /etc/containers stays untouched:
#   [engine] runtime = "runc"        crun fails on this machine's hybrid cgroups
#   [containers] default_ulimits     nofile and nproc limits podman would otherwise ask for
# Nothing can be pulled here: build images with `podman import` (a rootfs tarball; the
# tests import one made of Debian's static busybox, installed here too) or
# FROM scratch with static binaries.
#
# Ready when GET /_ping answers OK. `down` first removes every container labelled
# trellis.service (what Trellis' docker deployer and its tests created), then stops the
# service.
#
# Clients: DOCKER_HOST=unix://$TRELLIS_SERVICES_HOME/podman/podman.sock; run the podman CLI
# with CONTAINERS_CONF=$TRELLIS_SERVICES_HOME/podman/containers.conf to see the same settings.

ENGINE_TIMEOUT=60

_podman_home() { echo "$TRELLIS_SERVICES_HOME/podman"; }
_podman_socket() { echo "$(_podman_home)/podman.sock"; }

engine_log() { echo "$(_podman_home)/logs/service.log"; }

engine_install() {
  local home
  home="$(_podman_home)"
  mkdir -p "$home/logs"
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null ||
    ! dpkg -s busybox-static >/dev/null 2>&1; then
    echo "podman: installing podman and runc from Debian"
    {
      apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
          podman runc conmon containernetworking-plugins iptables uidmap catatonit busybox-static \
          ca-certificates
    } >"$home/logs/apt.log" 2>&1 || {
      echo "podman: apt-get install failed; see $home/logs/apt.log" >&2
      tail -n 30 "$home/logs/apt.log" >&2
      return 1
    }
  fi
  cat >"$home/containers.conf" <<'CONF'
# Written by scripts/engines/podman.sh; passed to podman through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
events_logger = "file"
cgroup_manager = "cgroupfs"
CONF
}

engine_start() {
  local home
  home="$(_podman_home)"
  rm -f "$(_podman_socket)"
  : >"$(engine_log)"
  (
    export CONTAINERS_CONF="$home/containers.conf"
    exec nohup podman system service --time=0 "unix://$(_podman_socket)" >"$(engine_log)" 2>&1
  ) &
  echo $! >"$(pidfile podman)"
}

engine_ready() {
  [ -S "$(_podman_socket)" ] &&
    [ "$(curl -sS --max-time 3 --unix-socket "$(_podman_socket)" http://d/_ping 2>/dev/null)" = "OK" ]
}

# Removes the containers Trellis created (label trellis.service), running or not.
engine_stop() {
  local ids
  engine_ready || return 0
  ids="$(curl -sS --max-time 10 --unix-socket "$(_podman_socket)" -G \
    --data-urlencode 'all=true' --data-urlencode 'filters={"label":["trellis.service"]}' \
    http://d/v1.41/containers/json 2>/dev/null | python3 -c '
import json, sys
for c in json.load(sys.stdin):
    print(c["Id"])' 2>/dev/null)" || true
  for id in $ids; do
    curl -sS --max-time 30 --unix-socket "$(_podman_socket)" -X DELETE \
      "http://d/v1.41/containers/$id?force=true" >/dev/null 2>&1 || true
  done
}
