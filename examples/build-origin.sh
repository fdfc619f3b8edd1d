#!/usr/bin/env bash
# Builds the example directory origin that `make run` serves: bundles of examples/webapp, published with
# `ota-gateway release add`. usage: build-origin.sh OTA_GATEWAY_BIN ORIGIN_DIR
set -euo pipefail
bin=$1; origin=$2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$origin"; mkdir -p "$origin"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
publish() {  # version channel
  rm -rf "$work/web"; cp -r "$here/webapp" "$work/web"
  sed -i "s/VERSION/$1/" "$work/web/index.html"
  (cd "$work/web" && python3 -m zipfile -c "$work/$1.zip" index.html app.js)
  "$bin" release add --origin "$origin" --app com.example.app --version "$1" --channel "$2" "$work/$1.zip"
}
publish 1.0.0 production
publish 1.1.0 production
publish 1.2.0-beta.1 beta
