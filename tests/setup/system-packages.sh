#!/usr/bin/env bash
# The Debian packages the test suite starts or builds against, installed when missing:
# redis-server and promtool (started by the Redis and metrics tests), and the upstream stacks
# of tests/test_differential.py: Go, cJSON with a C compiler, Node.js with npm; and the Python
# headers the compiled build needs.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# The compiled build (mypyc) compiles against the Python headers of the interpreter in use.
include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$include/Python.h" ] || need+=(python3-dev)
[ -f /usr/include/cjson/cJSON.h ] || need+=(libcjson-dev)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ ${#need[@]} -eq 0 ] && exit 0

install="apt-get update && apt-get install -y --no-install-recommends ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "missing system packages; run: sudo sh -c '$install'" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}" >&2
${sudo[@]+"${sudo[@]}"} apt-get update -qq
${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
