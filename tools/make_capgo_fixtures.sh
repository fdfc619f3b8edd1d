#!/usr/bin/env bash
# Regenerates tests/fixtures/capgo with the real Capgo CLI (@capgo/cli from the npm registry): an RSA key pair from
# `capgo key create`, and per version a plain zip (`capgo bundle zip`) and an encrypted one (`capgo bundle encrypt`),
# with the checksums and session keys the CLI printed in fixtures.json. The outputs are committed; this script is only
# run to refresh them. Needs node and npm.
# usage: tools/make_capgo_fixtures.sh [OUTDIR] [SIZE_KIB]    (defaults: tests/fixtures/capgo, 64)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$here/tests/fixtures/capgo}"); size=${2:-64}
cli_version=8.68.1
cli=${CAPGO_CLI_DIR:-${TMPDIR:-/tmp}/ota-gateway-capgo-cli-$cli_version}
command -v npm >/dev/null || { echo "make_capgo_fixtures: npm is needed (apt-get install npm)" >&2; exit 2; }
mkdir -p "$out" "$cli"
if [[ ! -x $cli/node_modules/.bin/capgo ]]; then
  (cd "$cli" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund \
     "@capgo/cli@$cli_version" @capgo/capacitor-updater @capacitor/core >/dev/null)
fi
work=$(mktemp -d -p "$cli")   # inside the CLI's folder, so node resolves the plugin modules the zip check wants
trap 'rm -rf "$work"' EXIT
cd "$work"
cp "$cli/package.json" package.json
printf '%s\n' '{"appId":"com.example.app","appName":"Example","webDir":"dist",' \
  '"plugins":{"CapacitorUpdater":{"autoUpdate":true}}}' > capacitor.config.json
capgo() { "$cli/node_modules/.bin/capgo" "$@" </dev/null 2>/dev/null; }
json_block() { sed -n '/^{/,/^}/p'; }   # the CLI prints banners around its --json answer
capgo key create --force >/dev/null || true
[[ -s .capgo_key_v2 && -s .capgo_key_v2.pub ]] || { echo "make_capgo_fixtures: capgo key create made no key" >&2; exit 1; }
install -m 0644 .capgo_key_v2.pub "$out/key.pub"
install -m 0644 .capgo_key_v2 "$out/key"   # test-only key, readable on purpose
entries=()
for v in 1.0.0 1.1.0 2.0.0; do
  rm -rf dist; mkdir -p dist/assets
  echo "<html><body>version $v</body></html>" > dist/index.html
  echo 'import { CapacitorUpdater } from "@capgo/capacitor-updater"; CapacitorUpdater.notifyAppReady();' > dist/app.js
  head -c $((size * 1024)) /dev/urandom > dist/assets/blob.bin
  z=$(capgo bundle zip com.example.app --path dist --bundle "$v" --json --no-code-check | json_block)
  sum=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["checksum"])' <<<"$z")
  fn=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["filename"])' <<<"$z")
  mv "$fn" "$out/app_$v.zip"
  e=$(capgo bundle encrypt "$out/app_$v.zip" "$sum" --json | json_block)
  mv "$out/app_$v.zip_encrypted.zip" "$out/app_$v.enc.zip"
  entries+=("$(python3 - "$v" "$sum" "$e" <<'PY'
import json, sys
v, s, e = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(json.dumps({"version": v, "checksum": s, "encrypted_checksum": e["checksum"], "iv_session_key": e["ivSessionKey"],
                  "zip": f"app_{v}.zip", "encrypted_zip": f"app_{v}.enc.zip"}))
PY
)")
done
(IFS=,; echo "[${entries[*]}]") | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin), indent=1))' \
  > "$out/fixtures.json"
chmod 0644 "$out"/*.zip "$out/fixtures.json"
echo "made with @capgo/cli $cli_version in $out:"; ls -la "$out"
