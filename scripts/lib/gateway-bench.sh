# shellcheck shell=bash
# What scripts/bench-gateway and scripts/build-pgo both need to put load on a gateway.
#
#   source scripts/lib/gateway-bench.sh
#   gateway_bench_tools       # nginx and wrk from Debian, when missing
#   hs256_token SECRET SUB    # prints an HS256 JWT for subject SUB, valid for an hour

gateway_bench_tools() {
  command -v nginx >/dev/null && command -v wrk >/dev/null && return 0
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
}

hs256_token() {
  SECRET="$1" SUBJECT="$2" python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": os.environ["SUBJECT"], "exp": int(time.time()) + 3600}).encode())
sig = b64(hmac.new(os.environ["SECRET"].encode(), head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())
PY
}
