#!/usr/bin/env bash
# shellcheck shell=bash
# Installs what browser-tests/ needs: Debian's chromium (apt) and the npm packages of
# browser-tests/package-lock.json (`npm ci`: playwright-core only, which downloads no
# browser of its own). Idempotent and quick when both are present.
#
#   scripts/lib/browser.sh            # install, printing how long each part took
#   source scripts/lib/browser.sh; browser_install
#
# Knobs: CHROMIUM (default /usr/bin/chromium).

browser_install() {
  local repo start chromium
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  chromium="${CHROMIUM:-/usr/bin/chromium}"
  start=$SECONDS
  if [ ! -x "$chromium" ]; then
    echo "browser: installing chromium from Debian apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || { echo "browser: apt-get update failed" >&2; return 1; }
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null ||
      { echo "browser: apt-get install chromium failed" >&2; return 1; }
    echo "browser: chromium installed in $((SECONDS - start))s: $("$chromium" --version 2>/dev/null)"
  fi
  start=$SECONDS
  local lock="$repo/browser-tests/package-lock.json"
  local marker="$repo/browser-tests/node_modules/.trellis-lock"
  if [ ! -f "$marker" ] || ! cmp -s "$lock" "$marker"; then
    echo "browser: npm ci in browser-tests/"
    (cd "$repo/browser-tests" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) ||
      { echo "browser: npm ci failed" >&2; return 1; }
    cp "$lock" "$marker"
    echo "browser: npm packages installed in $((SECONDS - start))s"
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  browser_install
fi
