#!/usr/bin/env bash
# Turns what `aloft broker-config rmqtt` wrote (one node) into the configuration of an rmqttd
# raft cluster: one directory per node under OUT, each with its rmqtt.toml and plugins/ (the
# generated ACL, retainer and shared-subscription files, plus rmqtt-cluster-raft and, with
# --api-token, rmqtt-http-api on loopback). Node n (1, 2, ...) is the n-th NODE argument,
# HOST:MQTT:RPC:RAFT[:API]: its TLS listener, its gRPC port (message forwarding between nodes),
# its raft port and, optionally, its HTTP API port (bound to 127.0.0.1 whatever HOST is).
#
#   deploy/rmqtt/cluster.sh [--api-token TOKEN] FROM OUT NODE NODE NODE
#   cd OUT/1 && rmqttd -f rmqtt.toml       # likewise for OUT/2 and OUT/3
#
# Every node reads the TLS material and the retained-message store where FROM's rmqtt.toml
# names them (`--broker-dir`); each keeps its own retained store (`retain/<node id>`). The RPC
# and RAFT ports carry neither TLS nor authentication: keep them on a private network.
set -euo pipefail

api_token=""
if [[ "${1:-}" == "--api-token" ]]; then
    api_token="$2"
    shift 2
fi
if (($# < 4)); then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
from="$1"
out="$2"
shift 2
nodes=("$@")

for f in rmqtt.toml plugins/rmqtt-acl.toml plugins/rmqtt-retainer.toml \
    plugins/rmqtt-shared-subscription.toml; do
    [[ -f "$from/$f" ]] || {
        echo "$from/$f is missing: run aloft broker-config rmqtt --out $from first" >&2
        exit 1
    }
done

grpc_addrs=()
raft_addrs=()
for i in "${!nodes[@]}"; do
    IFS=: read -r host mqtt rpc raft api <<<"${nodes[$i]}"
    if [[ -z "$host" || -z "$mqtt" || -z "$rpc" || -z "$raft" ]]; then
        echo "node ${nodes[$i]}: expected HOST:MQTT:RPC:RAFT[:API]" >&2
        exit 2
    fi
    grpc_addrs+=("\"$((i + 1))@$host:$rpc\"")
    raft_addrs+=("\"$((i + 1))@$host:$raft\"")
done
join() {
    local IFS=,
    echo "$*"
}

for i in "${!nodes[@]}"; do
    id=$((i + 1))
    IFS=: read -r host mqtt rpc raft api <<<"${nodes[$i]}"
    dir="$out/$id"
    mkdir -p "$dir/plugins"
    cp "$from"/plugins/*.toml "$dir/plugins/"
    startups='"rmqtt-acl", "rmqtt-retainer", "rmqtt-shared-subscription", "rmqtt-cluster-raft"'
    disabled='"rmqtt-http-api"'
    if [[ -n "$api_token" && -n "$api" ]]; then
        startups="$startups, \"rmqtt-http-api\""
        disabled=""
        cat >"$dir/plugins/rmqtt-http-api.toml" <<EOF
# Written by deploy/rmqtt/cluster.sh: loopback only, every request needs the token (the API
# can publish anything, past the ACL).
http_laddr = "127.0.0.1:$api"
http_bearer_token = "$api_token"
http_request_log = false
max_row_limit = 10_000
EOF
    fi
    # The generated one-node file with this node's id, addresses, plugin directory and plugins.
    sed -e "s|^node.id = .*|node.id = $id|" \
        -e "s|^rpc.server_addr = .*|rpc.server_addr = \"$host:$rpc\"|" \
        -e "s|^listener.tls.external.addr = .*|listener.tls.external.addr = \"$host:$mqtt\"|" \
        -e "s|^plugins.dir = .*|plugins.dir = \"$dir/plugins\"|" \
        -e "s|^plugins.default_startups = .*|plugins.default_startups = [$startups]|" \
        -e "s|^plugins.disabled_default_startups = .*|plugins.disabled_default_startups = [$disabled]|" \
        "$from/rmqtt.toml" >"$dir/rmqtt.toml"
    cat >"$dir/plugins/rmqtt-cluster-raft.toml" <<EOF
# Written by deploy/rmqtt/cluster.sh: node $id of ${#nodes[@]}. node_grpc_addrs carry messages
# between nodes (a device's report to the orchestrator's node), raft_peer_addrs the cluster's
# state (which node holds which client, every subscription).
node_grpc_addrs = [$(join "${grpc_addrs[@]}")]
raft_peer_addrs = [$(join "${raft_addrs[@]}")]
laddr = "$host:$raft"
# Node 1 starts the cluster and the others join it. With the default (0), each node looks for
# a leader and leads if it finds none: nodes started together then make a cluster each
# (seen with rmqttd 0.24: three leaders, "Leader ID exception").
leader_id = 1
node_grpc_client_timeout = "10s"
try_lock_timeout = "10s"
compression = "zstd"
health.exit_on_node_unavailable = false
raft.heartbeat = "100ms"
raft.election_tick = 10
raft.heartbeat_tick = 5
raft.check_quorum = true
raft.pre_vote = true
EOF
    echo "node $id: $dir (mqtts $host:$mqtt, rpc $rpc, raft $raft${api:+, api 127.0.0.1:$api})"
done
