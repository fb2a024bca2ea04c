#!/usr/bin/env bash
# The Debian packages a make target needs, installed when missing.
#
#   system-packages.sh         what `make test` starts or builds against: redis-server and
#                              promtool (started by the Redis and metrics tests), the upstream
#                              stacks of tests/test_differential.py (Go, cJSON with a C compiler,
#                              Node.js with npm), and the Python headers the compiled build needs
#   system-packages.sh bench   what `make bench` runs: wrk, nginx, HAProxy and redis-server
#
# As root, or through passwordless sudo, it installs them with apt-get; otherwise it stops with
# the one command to run.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

need=()
case "${1:-test}" in
  test)
    have redis-server || need+=(redis-server)
    have promtool || need+=(prometheus)
    have go || need+=(golang-go)
    have gcc || need+=(gcc libc6-dev)
    # The compiled build (mypyc) compiles against the Python headers of the interpreter in use.
    include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$include/Python.h" ] || need+=(python3-dev)
    [ -f /usr/include/cjson/cJSON.h ] || need+=(libcjson-dev)
    have node || need+=(nodejs)
    have npm || need+=(npm)
    ;;
  bench)
    # nginx and haproxy live in sbin, which a user's PATH often lacks: the Makefile adds it.
    have wrk || need+=(wrk)
    have nginx || need+=(nginx-light)
    have haproxy || need+=(haproxy)
    have redis-server || need+=(redis-server)
    ;;
  *)
    echo "usage: $0 [test|bench]" >&2
    exit 2
    ;;
esac
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
