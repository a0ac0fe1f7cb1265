#!/bin/sh
# Puts the broker's secrets where compose.yaml mounts them, readable by the
# nodes' rabbitmq user and by nobody else on the host.
#
# Usage, as root, in deploy/rabbitmq/cluster:
#   ./prepare-secrets.sh /path/to/ca.pem /path/to/server.pem /path/to/server.key /path/to/definitions.json
#
# It makes (and compose.yaml mounts each file on its own, read-only):
#   tls/                    0700 root   the host's users cannot reach into it
#     ca.pem, server.pem    0444        public
#     server.key            0400 999:999
#   secrets/                0700 root
#     erlang.cookie         0400 999:999  made once, kept on later runs
#     definitions.json      0400 999:999  password hashes of every user
# 999:999 is the rabbitmq user and group of the rabbitmq:3.10 image; set
# RABBITMQ_UID/RABBITMQ_GID for another image, or to the remapped ids if the
# Docker daemon uses userns-remap. Erlang refuses a cookie file that its
# group or others may read, and the image's entrypoint chowns whatever in
# /var/lib/rabbitmq is not already the rabbitmq user's (which a read-only
# mount forbids): hence owner and mode exactly as here.
# tests/security/test_compose_secrets.py runs this script and checks the result.
set -eu

if [ "$#" -ne 4 ]; then
    echo "usage: $0 CA_PEM SERVER_PEM SERVER_KEY DEFINITIONS_JSON" >&2
    exit 2
fi
uid=${RABBITMQ_UID:-999}
gid=${RABBITMQ_GID:-999}
here=$(dirname "$0")
umask 077

install -d -m 0700 "$here/tls" "$here/secrets"
install -m 0444 "$1" "$here/tls/ca.pem"
install -m 0444 "$2" "$here/tls/server.pem"
install -m 0400 -o "$uid" -g "$gid" "$3" "$here/tls/server.key"
install -m 0400 -o "$uid" -g "$gid" "$4" "$here/secrets/definitions.json"
if [ ! -s "$here/secrets/erlang.cookie" ]; then
    # 64 hex characters; the same file is mounted in every node.
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$here/secrets/erlang.cookie.new"
    mv "$here/secrets/erlang.cookie.new" "$here/secrets/erlang.cookie"
fi
chown "$uid:$gid" "$here/secrets/erlang.cookie"
chmod 0400 "$here/secrets/erlang.cookie"
echo "tls/ and secrets/ ready (owner of the private files: $uid:$gid)"
