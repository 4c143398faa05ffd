# shellcheck shell=bash
# A real Kubernetes API server for scripts/services: etcd 3.6 on 127.0.0.1:2379 (peer
# 127.0.0.1:2380) and kube-apiserver on https://127.0.0.1:6443. Nothing else: no
# controller-manager, scheduler or kubelet, so objects are stored and validated but never
# reconciled (a Deployment is accepted and never becomes available).
#
# Installed from the Go module proxy (neither is packaged in Debian at a usable version):
# two throw-away tool modules under $TRELLIS_SERVICES_HOME/kube/src. kube-apiserver's module
# requires k8s.io/kubernetes, whose go.mod requires each staging module k8s.io/<name> at
# v0.0.0 (resolved by `replace => ./staging/...` upstream); the tool module replaces each by
# its published v0.N.M. etcd is built from go.etcd.io/etcd/server/v3 the same way. The Go
# module and build caches stay at their defaults, so a rebuild after `rm -r .../bin` takes
# seconds; the first build takes minutes.
#
# Security, loopback only: both listen on 127.0.0.1. kube-apiserver serves TLS with a
# certificate (SAN IP:127.0.0.1, DNS:localhost) signed by a test CA generated once with
# openssl; clients authenticate with a bearer token from --token-auth-file for the user
# trellis-admin in group system:masters (RBAC is on: that group is cluster-admin). A
# service-account signing key is generated too. All under $TRELLIS_SERVICES_HOME/kube/pki;
# delete that folder to have them made again.
#
# Clients use $TRELLIS_SERVICES_HOME/kube/kubeconfig (written by `up`).
# Ready when /readyz answers "ok" to the admin token.
#
# Knobs: KUBE_VERSION (default 1.36.3), ETCD_VERSION (default 3.6.16), KUBE_APISERVER_PORT
# (default 6443), ETCD_CLIENT_PORT (default 2379), ETCD_PEER_PORT (default 2380).

ENGINE_TIMEOUT=120

_kube_home() { echo "$TRELLIS_SERVICES_HOME/kube"; }
_kube_version() { echo "${KUBE_VERSION:-1.36.3}"; }
_etcd_version() { echo "${ETCD_VERSION:-3.6.16}"; }
_kube_port() { echo "${KUBE_APISERVER_PORT:-6443}"; }
_etcd_port() { echo "${ETCD_CLIENT_PORT:-2379}"; }
_etcd_peer_port() { echo "${ETCD_PEER_PORT:-2380}"; }

engine_log() { echo "$(_kube_home)/logs/kube-apiserver.log"; }

engine_install() {
  local home
  home="$(_kube_home)"
  mkdir -p "$home"/{bin,src,pki,logs,etcd-data}
  command -v go >/dev/null || {
    echo "kube: the Go toolchain (go) is required to build etcd and kube-apiserver" >&2
    return 1
  }
  _kube_build_etcd "$home" || return 1
  _kube_build_apiserver "$home" || return 1
  _kube_pki "$home" || return 1
  _kube_write_kubeconfig "$home"
}

# Builds one binary from a tool module, once per version (marker bin/.NAME-VERSION).
# Prints the build time; on failure prints the end of logs/build-NAME.log.
_kube_go_build() {
  local home="$1" name="$2" version="$3" package="$4" dir="$1/src/$2"
  if [ -x "$home/bin/$name" ] && [ -f "$home/bin/.$name-$version" ]; then
    return 0
  fi
  local started=$SECONDS
  echo "kube: building $name $version from the Go module proxy (first time: minutes)"
  (
    cd "$dir" &&
      go mod tidy &&
      CGO_ENABLED=0 go build -trimpath -o "$home/bin/$name.tmp" "$package"
  ) >"$home/logs/build-$name.log" 2>&1 || {
    echo "kube: building $name failed after $((SECONDS - started))s; see $home/logs/build-$name.log" >&2
    tail -n 40 "$home/logs/build-$name.log" >&2
    return 1
  }
  mv "$home/bin/$name.tmp" "$home/bin/$name"
  rm -f "$home/bin/.$name-"*
  touch "$home/bin/.$name-$version"
  echo "kube: built $name in $((SECONDS - started))s"
}

_kube_build_etcd() {
  local home="$1" version dir
  version="$(_etcd_version)"
  dir="$home/src/etcd"
  mkdir -p "$dir"
  cat >"$dir/go.mod" <<MOD
module trellis.local/etcd-tool

go 1.24

require go.etcd.io/etcd/server/v3 v$version

tool go.etcd.io/etcd/server/v3
MOD
  _kube_go_build "$home" etcd "$version" go.etcd.io/etcd/server/v3
}

_kube_build_apiserver() {
  local home="$1" version dir upstream
  version="$(_kube_version)"
  dir="$home/src/kube-apiserver"
  mkdir -p "$dir"
  if [ -x "$home/bin/kube-apiserver" ] && [ -f "$home/bin/.kube-apiserver-$version" ]; then
    return 0
  fi
  # k8s.io/kubernetes's own go.mod names the staging modules it requires at v0.0.0.
  upstream="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$version" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  if [ -z "$upstream" ] || [ ! -f "$upstream" ]; then
    echo "kube: could not download k8s.io/kubernetes@v$version's go.mod from the Go module proxy" >&2
    return 1
  fi
  {
    echo "module trellis.local/kube-apiserver-tool"
    echo
    echo "go 1.26"
    echo
    echo "require k8s.io/kubernetes v$version"
    echo
    echo "tool k8s.io/kubernetes/cmd/kube-apiserver"
    echo
    sed -n 's/^[[:space:]]*\(k8s\.io\/[a-z0-9-]*\) v0\.0\.0$/\1/p' "$upstream" | sort -u |
      while read -r module; do
        echo "replace $module => $module v0.${version#1.}"
      done
  } >"$dir/go.mod"
  _kube_go_build "$home" kube-apiserver "$version" k8s.io/kubernetes/cmd/kube-apiserver
}

# Test CA, serving certificate, service-account key and admin token; made once, in pki.tmp,
# then renamed, so an interrupted run never leaves half of it behind.
_kube_pki() {
  local home="$1" dir="$1/pki" tmp="$1/pki.tmp"
  if [ -f "$dir/ca.crt" ] && [ -f "$dir/apiserver.crt" ] && [ -f "$dir/sa.key" ] && [ -f "$dir/tokens.csv" ]; then
    return 0
  fi
  command -v openssl >/dev/null || {
    echo "kube: openssl is required to generate the test certificates" >&2
    return 1
  }
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (
    set -e
    cd "$tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=trellis-test-kube-ca" \
      -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr
    cat >apiserver.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default
EXT
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    echo "$(openssl rand -hex 32),trellis-admin,trellis-admin,\"system:masters\"" >tokens.csv
    chmod 600 ./*.key tokens.csv
  ) >"$home/logs/pki.log" 2>&1 || {
    echo "kube: generating certificates failed; see $home/logs/pki.log" >&2
    tail -n 20 "$home/logs/pki.log" >&2
    return 1
  }
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

_kube_token() { cut -d, -f1 "$(_kube_home)/pki/tokens.csv"; }

_kube_write_kubeconfig() {
  local home="$1" ca
  ca="$(base64 -w0 <"$home/pki/ca.crt")"
  umask 077
  cat >"$home/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: trellis
  cluster:
    server: https://127.0.0.1:$(_kube_port)
    certificate-authority-data: $ca
users:
- name: trellis-admin
  user:
    token: $(_kube_token)
contexts:
- name: trellis
  context:
    cluster: trellis
    user: trellis-admin
    namespace: default
current-context: trellis
KCFG
}

engine_start() {
  local home pki
  home="$(_kube_home)"
  pki="$home/pki"
  : >"$home/logs/etcd.log"
  : >"$home/logs/kube-apiserver.log"
  if ! { [ -f "$home/etcd.pid" ] && kill -0 "$(cat "$home/etcd.pid")" 2>/dev/null; }; then
    (
      exec nohup "$home/bin/etcd" --name trellis --data-dir "$home/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$(_etcd_port)" \
        --advertise-client-urls "http://127.0.0.1:$(_etcd_port)" \
        --listen-peer-urls "http://127.0.0.1:$(_etcd_peer_port)" \
        --initial-advertise-peer-urls "http://127.0.0.1:$(_etcd_peer_port)" \
        --initial-cluster "trellis=http://127.0.0.1:$(_etcd_peer_port)" \
        --listen-metrics-urls "" --log-level warn \
        >"$home/logs/etcd.log" 2>&1
    ) &
    echo $! >"$home/etcd.pid"
  fi
  # The recorded pid is kube-apiserver's own; engine_stop stops etcd after it.
  (
    exec nohup "$home/bin/kube-apiserver" \
      --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$(_kube_port)" \
      --etcd-servers="http://127.0.0.1:$(_etcd_port)" \
      --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
      --token-auth-file="$pki/tokens.csv" --authorization-mode=RBAC \
      --anonymous-auth=false \
      --service-account-key-file="$pki/sa.pub" \
      --service-account-signing-key-file="$pki/sa.key" \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-cluster-ip-range=10.96.0.0/16 \
      --cert-dir="$home/pki/generated" \
      --enable-priority-and-fairness=false \
      --profiling=false \
      >"$home/logs/kube-apiserver.log" 2>&1
  ) &
  echo $! >"$(pidfile kube)"
}

engine_stop() {
  local home pid
  home="$(_kube_home)"
  pid="$(cat "$(pidfile kube)" 2>/dev/null || true)"
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
  fi
  if [ -f "$home/etcd.pid" ]; then
    pid="$(cat "$home/etcd.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$home/etcd.pid"
  fi
}

engine_ready() {
  local home
  home="$(_kube_home)"
  [ -f "$home/pki/tokens.csv" ] || return 1
  [ "$(curl -sS --max-time 3 --cacert "$home/pki/ca.crt" \
    -H "Authorization: Bearer $(_kube_token)" \
    "https://127.0.0.1:$(_kube_port)/readyz" 2>/dev/null)" = "ok" ]
}
