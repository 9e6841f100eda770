#!/bin/sh
# Refresh the vendored xterm.js files from the npm registry.
set -e
XTERM="${XTERM:-6.0.0}" FIT="${FIT:-0.11.0}"
DEST="$(cd "$(dirname "$0")/.." && pwd)/bai_session_apps/static/vendor/xterm"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
npm pack -q "@xterm/xterm@$XTERM" "@xterm/addon-fit@$FIT" >/dev/null
mkdir x f; tar xzf xterm-xterm-*.tgz -C x; tar xzf xterm-addon-fit-*.tgz -C f
cp x/package/lib/xterm.js x/package/css/xterm.css f/package/lib/addon-fit.js "$DEST/"
cp x/package/LICENSE "$DEST/LICENSE.xterm"; cp f/package/LICENSE "$DEST/LICENSE.addon-fit"
sed -i '/^\/\/# sourceMappingURL=/d' "$DEST/xterm.js" "$DEST/addon-fit.js"
