#!/bin/bash
# Builds a container image of llama-server from a rootfs tarball (the binary, the shared
# libraries ldd lists, the dynamic loader; the model directory is mounted as a volume) and
# imports it into Podman (localhost/llama-server:test) and Docker (llama-server:test).
# Usage: build-llama-image.sh LLAMA_DIR   (LLAMA_DIR/bin/llama-server from build-llama-server.sh)
set -euo pipefail
BIN="$1/bin/llama-server"
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }
DOCKER_CLI=/usr/bin/docker; [ -x "$DOCKER_CLI" ] || DOCKER_CLI=docker
R=$(mktemp -d); trap 'rm -rf "$R"' EXIT
mkdir -p "$R/models" "$R/tmp" "$R/etc"
cp "$BIN" "$R/llama-server"
for lib in $(ldd "$BIN" | grep -oE '/[^ ]+\.so[^ ]*'); do
  mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"
done
echo 'root:x:0:0:root:/:/llama-server' >"$R/etc/passwd"; echo 'root:x:0:' >"$R/etc/group"
tar -C "$R" -cf "$R.tar" .
podman import -q --change 'ENTRYPOINT ["/llama-server"]' "$R.tar" localhost/llama-server:test >/dev/null
DOCKER_HOST=${DOCKER_HOST:-unix:///run/docker.sock} "$DOCKER_CLI" import --change 'ENTRYPOINT ["/llama-server"]' "$R.tar" llama-server:test >/dev/null
rm -f "$R.tar"
echo "localhost/llama-server:test (podman), llama-server:test (docker)"
