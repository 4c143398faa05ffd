# shellcheck shell=bash
# Jaeger v2 for scripts/services: the all-in-one `jaeger` binary with in-memory storage.
# OTLP gRPC on 127.0.0.1:4317, OTLP HTTP on 127.0.0.1:4318, query API and UI on
# 127.0.0.1:16686 (`/api/services`, `/api/traces?service=NAME`), health on 127.0.0.1:13133.
#
# Built from the Go module proxy: `go install …/cmd/jaeger@VERSION` fails because Jaeger's
# go.mod carries a `replace` for sarama, so a throw-away module under
# $TRELLIS_SERVICES_HOME/jaeger/build takes the binary as a tool dependency, repeats the
# replace, and builds it. GOMODCACHE stays the default (~/go/pkg/mod) so rebuilds are quick.
#
# Ready when the health endpoint answers 200 and the OTLP HTTP port accepts connections.
# Knobs: JAEGER_VERSION (Go module version, default v1.76.0 = Jaeger v2.13.0).

ENGINE_TIMEOUT=60

_jaeger_home() { echo "$TRELLIS_SERVICES_HOME/jaeger"; }
_jaeger_version() { echo "${JAEGER_VERSION:-v1.76.0}"; }

engine_log() { echo "$(_jaeger_home)/logs/jaeger.log"; }

engine_install() {
  local home version build
  home="$(_jaeger_home)"
  version="$(_jaeger_version)"
  build="$home/build"
  mkdir -p "$home"/{bin,logs,build}
  if [ -x "$home/bin/jaeger" ] && [ "$(cat "$home/bin/version" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  if ! command -v go >/dev/null; then
    echo "jaeger: the Go toolchain is needed to build Jaeger (go not found)" >&2
    return 1
  fi
  echo "jaeger: building github.com/jaegertracing/jaeger/cmd/jaeger@$version (several minutes the first time)"
  local start=$SECONDS
  (
    set -e
    cd "$build"
    rm -f go.mod go.sum
    export GOFLAGS=-mod=mod GOTOOLCHAIN=local
    go mod init trellis.local/jaeger-build >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$version"
    # Same replace as Jaeger's own go.mod, without which the build does not resolve.
    go mod edit -replace github.com/Shopify/sarama=github.com/Shopify/sarama@v1.33.0
    go mod tidy
    go build -o "$home/bin/jaeger.new" github.com/jaegertracing/jaeger/cmd/jaeger
  ) >>"$home/logs/build.log" 2>&1 || {
    echo "jaeger: build failed; see $home/logs/build.log" >&2
    tail -n 40 "$home/logs/build.log" >&2
    return 1
  }
  mv "$home/bin/jaeger.new" "$home/bin/jaeger"
  echo "$version" >"$home/bin/version"
  echo "jaeger: built in $((SECONDS - start))s"
}

engine_start() {
  local home
  home="$(_jaeger_home)"
  if [ ! -x "$home/bin/jaeger" ]; then
    echo "jaeger: $home/bin/jaeger is missing (the build failed?)" >&2
    return 1
  fi
  mkdir -p "$home/logs" "$home/conf"
  _jaeger_config >"$home/conf/config.yaml"
  : >"$home/logs/jaeger.log"
  # The recorded pid must be the binary's own, so `down` stops Jaeger itself.
  (
    exec nohup "$home/bin/jaeger" --config "$home/conf/config.yaml" \
      >"$home/logs/jaeger.log" 2>&1
  ) &
  echo $! >"$(pidfile jaeger)"
}

# All-in-one configuration equivalent to Jaeger's built-in default, but bound to 127.0.0.1.
_jaeger_config() {
  cat <<'YAML'
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:13133
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:16686
    grpc:
      endpoint: 127.0.0.1:16685
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:4317
      http:
        endpoint: 127.0.0.1:4318
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
YAML
}

engine_ready() {
  curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:13133/status 2>/dev/null &&
    curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:16686/api/services 2>/dev/null &&
    (exec 3<>/dev/tcp/127.0.0.1/4318) 2>/dev/null
}
