#!/usr/bin/env bash
# An Aloft campaign on a 3-node rmqttd cluster, on this machine (issue 12 §4; docs/SCALING.md,
# "Clustered broker (rmqttd)"). Not part of the test suite: rmqttd takes 20-40 minutes to build.
#
# In a temporary directory, with loopback ports chosen at run time, it makes a lab the way the
# end-to-end tests do beside Mosquitto, but with the command-line tools: `aloft init`, an
# operator profile, a root of trust and a release key, devices enrolled by CSR and certified by
# the fleet CA, and `aloft broker-config rmqtt` for the broker. Then:
#  1. three rmqttd nodes as a raft cluster (deploy/rmqtt/cluster.sh), waited for until healthy;
#  2. the checks below (mosquitto_pub/mosquitto_sub): what the cluster admits and refuses, and
#     a retained message and a shared subscription across nodes;
#  3. `aloft serve --broker` against node 1 (--replicas N: N of them on the same data directory,
#     each with its own --replica-id, spread over the nodes, on a throwaway PostgreSQL when N > 1);
#  4. every device registered, `device-sim run` with the devices spread over the three nodes;
#  5. a release of --image-kib KiB built, uploaded and rolled out to every device with
#     `aloft campaign create --all`, followed until it finishes;
#  6. the outcome counts and timings; everything it started is stopped on exit.
# Exits 0 only if the checks passed and every device succeeded.
#
# usage: deploy/rmqtt/cluster-campaign.sh [--devices N] [--replicas N] [--postgres]
#            [--image-kib K] [--rmqttd PATH] [--bin-dir DIR] [--timeout SECS] [--keep]
#            [--no-checks]
#   --postgres the store on a throwaway PostgreSQL even with one replica
#   --rmqttd   the broker [default: $RMQTTD, else rmqttd on PATH]
#              (cargo install rmqttd --version 0.24.0 --locked --root DIR; needs
#              apt-get install protobuf-compiler cmake)
#   --bin-dir  where `aloft` and `device-sim` are [default: target/release of this checkout]
#              (cargo build --release -p aloft-orchestrator -p aloft-device)
#   --keep     leave the temporary directory (logs, configuration) in place
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

devices=100
replicas=1
image_kib=1024
rmqttd="${RMQTTD:-$(command -v rmqttd || true)}"
bin_dir="$repo/target/release"
timeout_secs=600
keep=0
checks=1
postgres=0
while (($#)); do
    case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    --image-kib) image_kib="$2"; shift 2 ;;
    --rmqttd) rmqttd="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --timeout) timeout_secs="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --postgres) postgres=1; shift ;;
    --no-checks) checks=0; shift ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done

aloft="$bin_dir/aloft"
sim="$bin_dir/device-sim"
for b in "$aloft" "$sim"; do
    [[ -x "$b" ]] || {
        echo "$b is missing: cargo build --release -p aloft-orchestrator -p aloft-device" >&2
        exit 1
    }
done
[[ -n "$rmqttd" && -x "$rmqttd" ]] || {
    echo "no rmqttd: pass --rmqttd PATH or set RMQTTD (see --help)" >&2
    exit 1
}
for tool in mosquitto_pub mosquitto_sub curl jq openssl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

tmp="$(mktemp -d -t aloft-rmqtt-XXXXXX)"
pids=()
pg_data=""
cleanup() {
    local status=$?
    # Stopped in reverse order of starting: devices, orchestrators, brokers.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[$i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$pg_data" ]]; then
        as_postgres "$pg_bin/pg_ctl" -D "$pg_data" stop -m fast -w >/dev/null 2>&1 || true
    fi
    if ((keep)); then
        echo "kept $tmp"
    else
        rm -rf "$tmp"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { echo $(($(date +%s%N) / 1000000)); }
start_ms=$(now_ms)
log() { printf '[%6ss] %s\n' "$(awk -v t=$(($(now_ms) - start_ms)) 'BEGIN { printf "%.1f", t / 1000 }')" "$*"; }

# Free loopback ports, all bound at once so that they differ, then released for their users.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Waits until `cmd...` succeeds, at most $1 seconds.
wait_for() {
    local secs="$1" what="$2"
    shift 2
    local deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) > deadline)); then
            echo "timed out after ${secs}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Peak resident set (VmHWM) of a process, in MiB.
peak_mib() {
    awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"
}

export ALOFT_UNLOCK="cluster-campaign lab passphrase, not a secret"
orch="$tmp/orchestrator"
profile="$tmp/ops"
fleet="$tmp/fleet"

# --- PostgreSQL (only with replicas) -----------------------------------------------------------
as_postgres() {
    if (($(id -u) == 0)); then
        runuser -u nobody -- "$@"
    else
        "$@"
    fi
}
((replicas > 1)) && postgres=1
if ((postgres)); then
    pg_bin="${ALOFT_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
    [[ -x "$pg_bin/initdb" ]] || pg_bin="$(dirname "$(command -v initdb)")"
    read -r pg_port <<<"$(free_ports 1)"
    mkdir -p "$tmp/pg"
    (($(id -u) == 0)) && chown nobody "$tmp/pg" && chmod 755 "$tmp"
    as_postgres "$pg_bin/initdb" -D "$tmp/pg/data" -U aloft -A trust -E UTF8 --locale=C \
        --no-sync >"$tmp/pg/initdb.log"
    pg_data="$tmp/pg/data"
    as_postgres "$pg_bin/pg_ctl" -D "$pg_data" -l "$tmp/pg/server.log" -w start \
        -o "-p $pg_port -k $tmp/pg -c listen_addresses=127.0.0.1 -c max_connections=200" \
        >/dev/null
    as_postgres "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U aloft aloft
    export ALOFT_STORE="postgres://aloft@127.0.0.1:$pg_port/aloft"
    log "PostgreSQL on 127.0.0.1:$pg_port"
fi

# --- The lab: data directory, operator, root of trust, devices --------------------------------
log "lab in $tmp: $devices devices, $replicas replica(s), ${image_kib} KiB image"
"$aloft" init --data-dir "$orch" --hostname 127.0.0.1 2>"$tmp/init.log" >/dev/null
"$aloft" pki issue-operator --ca-dir "$orch/pki" --name ops --role security-admin \
    --out-dir "$profile" >/dev/null
root_pub="$("$aloft" trust keygen --out "$tmp/root-a.key" 2>/dev/null)"
release_pub="$("$aloft" release keygen --out "$tmp/release.key" 2>/dev/null)"
"$aloft" trust root-new --out "$tmp/root-1.json" --root-key "$root_pub" \
    --release-key "$release_pub" >/dev/null 2>&1
"$aloft" trust sign --root "$tmp/root-1.json" --key "$tmp/root-a.key" >/dev/null
"$aloft" trust install --data-dir "$orch" "$tmp/root-1.json" >/dev/null
"$sim" enroll --dir "$fleet" --count "$devices" --root "$tmp/root-1.json" >/dev/null
"$aloft" pki issue-devices --ca-dir "$orch/pki" --csr-dir "$fleet/devices" >/dev/null
cp "$orch/pki/ca.crt" "$fleet/"
log "lab ready"

# --- Three rmqttd nodes ------------------------------------------------------------------------
read -r -a ports <<<"$(free_ports 12)"
node_spec=()
mqtt_ports=()
api_ports=()
for n in 0 1 2; do
    mqtt_ports+=("${ports[$((n * 4))]}")
    api_ports+=("${ports[$((n * 4 + 3))]}")
    node_spec+=("127.0.0.1:${ports[$((n * 4))]}:${ports[$((n * 4 + 1))]}:${ports[$((n * 4 + 2))]}:${ports[$((n * 4 + 3))]}")
done
token="$(openssl rand -hex 16)"
"$aloft" broker-config rmqtt --data-dir "$orch" --out "$tmp/rmqtt" --broker-dir "$tmp/rmqtt" \
    --listen "127.0.0.1:${mqtt_ports[0]}" --hostname 127.0.0.1 --hostname localhost \
    --operator ops=security-admin >/dev/null
"$here/cluster.sh" --api-token "$token" "$tmp/rmqtt" "$tmp/cluster" "${node_spec[@]}" >/dev/null
broker_pids=()
for n in 1 2 3; do
    (cd "$tmp/cluster/$n" && exec "$rmqttd" -f rmqtt.toml >"$tmp/cluster/$n/rmqttd.log" 2>&1) &
    pids+=("$!")
    broker_pids+=("$!")
done
api() { curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:${api_ports[0]}/api/v1/$1"; }
cluster_healthy() {
    api health/check | jq -e '.running == true and ([.nodes[] | select(.running)] | length) == 3'
}
for n in 0 1 2; do
    wait_for 60 "rmqttd node $((n + 1)) to listen" \
        bash -c "exec 3<>/dev/tcp/127.0.0.1/${mqtt_ports[$n]}"
done
wait_for 120 "the raft cluster to elect a leader" cluster_healthy
log "rmqttd cluster up: $("$rmqttd" --version 2>/dev/null | head -1), nodes on ${mqtt_ports[*]}"

# --- Checks with mosquitto_pub / mosquitto_sub ------------------------------------------------
failed_checks=0
check() {
    local what="$1"
    shift
    if "$@"; then
        log "check ok: $what"
    else
        log "CHECK FAILED: $what"
        failed_checks=$((failed_checks + 1))
    fi
}
dev0="$(printf 'dev-%05d' 0)"
dev1="$(printf 'dev-%05d' 1)"
as_device() { # as_device ID NODE(0-2) mosquitto_xxx-args...
    local id="$1" node="$2"
    shift 2
    "$@" -V 5 -h 127.0.0.1 -p "${mqtt_ports[$node]}" --cafile "$fleet/ca.crt" \
        --cert "$fleet/devices/$id.crt" --key "$fleet/devices/$id.key"
}
as_device_bg() { # the same, replacing the (background) shell, so that its pid is the client's
    local id="$1" node="$2"
    shift 2
    exec "$@" -V 5 -h 127.0.0.1 -p "${mqtt_ports[$node]}" --cafile "$fleet/ca.crt" \
        --cert "$fleet/devices/$id.crt" --key "$fleet/devices/$id.key"
}
# The PUBACK reason code a QoS 1 publish gets (135 = not authorized), or "none" (mosquitto_pub
# exits non-zero when refused: the code is read from its debug output).
puback() {
    local out code
    out="$(as_device "$@" -q 1 -m '{}' -d 2>&1 || true)"
    code="$(sed -n 's/.*received PUBACK.*RC:\([0-9]*\).*/\1/p' <<<"$out" | head -1)"
    echo "${code:-none}"
}
# The SUBACK code a subscription gets (128 = refused), or "none".
suback() {
    local out code
    out="$(as_device "$@" -q 1 -d -W 2 -C 1 2>&1 || true)"
    code="$(sed -n 's/.*Subscribed (mid: [0-9]*): \([0-9]*\).*/\1/p' <<<"$out" | head -1)"
    echo "${code:-none}"
}
no_session() { # no_session EXTRA-ARGS...: no CONNACK without a fleet certificate
    ! mosquitto_pub -V 5 -h 127.0.0.1 -p "${mqtt_ports[0]}" --cafile "$fleet/ca.crt" \
        -t aloft/v1/d/x/status -q 1 -m '{}' "$@" >/dev/null 2>&1
}
if ((checks)); then
    # A device certificate (CN dev0, client auth) from a CA the fleet does not trust.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj "/CN=Foreign CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign" \
        -keyout "$tmp/foreign-ca.key" -out "$tmp/foreign-ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$dev0" \
        -keyout "$tmp/foreign.key" -out "$tmp/foreign.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' >"$tmp/foreign.ext"
    openssl x509 -req -in "$tmp/foreign.csr" -CA "$tmp/foreign-ca.crt" \
        -CAkey "$tmp/foreign-ca.key" -CAcreateserial -days 1 -extfile "$tmp/foreign.ext" \
        -out "$tmp/foreign.crt" 2>/dev/null
    check "no session without a client certificate" no_session
    check "no session with a certificate from another CA" \
        no_session --cert "$tmp/foreign.crt" --key "$tmp/foreign.key"
    check "a device publishes its own status (PUBACK 0)" \
        test "$(puback "$dev0" 1 mosquitto_pub -t "aloft/v1/d/$dev0/status")" = 0
    check "a device may not publish another device's status (PUBACK 135)" \
        test "$(puback "$dev0" 1 mosquitto_pub -t "aloft/v1/d/$dev1/status")" = 135
    check "a device may not publish its own job (PUBACK 135)" \
        test "$(puback "$dev0" 2 mosquitto_pub -t "aloft/v1/d/$dev0/job" -r)" = 135
    check "a device may not publish an admin request (PUBACK 135)" \
        test "$(puback "$dev0" 0 mosquitto_pub -t "aloft/v1/admin/ops/campaign.list")" = 135
    check "a device subscribes to its own subtree (SUBACK 1)" \
        test "$(suback "$dev0" 1 mosquitto_sub -t "aloft/v1/d/$dev0/#")" = 1
    for filter in "#" "aloft/#" "aloft/v1/d/+/job" "aloft/v1/d/$dev1/#" "aloft/v1/admin/#"; do
        check "a device may not subscribe to $filter (SUBACK 128)" \
            test "$(suback "$dev0" 2 mosquitto_sub -t "$filter")" = 128
    done
    # rmqttd does not bind the client id to the certificate: a device may connect under another
    # device's client id and take its session over. Its rights should stay its own
    # certificate's, but rmqtt-acl keys a client's `%u` filters by client id and can leave a
    # session's filters behind when sessions of one client id take each other over
    # (deploy/rmqtt/repro-acl-client-id.sh). Five copies of dev1 take each other over on node 1
    # while dev0 connects there as client id dev1; then, with no dev1 connected, dev0 tries
    # once more. A known gap of rmqttd 0.24: reported, not counted as a failed check.
    spoof_during=0
    spoof_after=0
    for round in 1 2 3; do
        copies=()
        for _ in 1 2 3 4 5; do
            as_device_bg "$dev1" 0 mosquitto_sub -i "$dev1" -t "aloft/v1/d/$dev1/job" -q 1 \
                >/dev/null 2>&1 &
            copies+=("$!")
        done
        for _ in $(seq 1 10); do
            [[ "$(puback "$dev0" 0 mosquitto_pub -i "$dev1" -t "aloft/v1/d/$dev1/status")" == 0 ]] &&
                spoof_during=$((spoof_during + 1))
        done
        kill "${copies[@]}" 2>/dev/null || true
        wait "${copies[@]}" 2>/dev/null || true
        sleep 1
        [[ "$(puback "$dev0" 0 mosquitto_pub -i "$dev1" -t "aloft/v1/d/$dev1/status")" == 0 ]] &&
            spoof_after=$((spoof_after + 1))
        # A clean session of dev1 on node 1 removes what was left behind.
        as_device "$dev1" 0 mosquitto_pub -i "$dev1" -t "aloft/v1/d/$dev1/status" -q 1 -m '{}' \
            >/dev/null 2>&1 || true
    done
    log "known gap (rmqttd): dev0's certificate under client id $dev1 published on $dev1's" \
        "status: $spoof_during of 30 tries during takeovers, $spoof_after of 3 after them" \
        "with no $dev1 connected"
    # A device's own retained message (the ACL cannot refuse retain) stored through node 2 is
    # delivered to a subscriber on node 3, then cleared.
    as_device "$dev0" 1 mosquitto_pub -t "aloft/v1/d/$dev0/health" -q 1 -r -m retained-probe
    sleep 1
    got="$(as_device "$dev0" 2 mosquitto_sub -t "aloft/v1/d/$dev0/health" -q 1 -C 1 -W 5 \
        2>/dev/null || true)"
    check "a retained message published on node 2 reaches a subscriber on node 3" \
        test "$got" = retained-probe
    as_device "$dev0" 1 mosquitto_pub -t "aloft/v1/d/$dev0/health" -q 1 -r -n
    # Two members of one shared-subscription group on nodes 1 and 3 (a device's own topic, as
    # no test client has the orchestrator's key): ten messages from node 2 are each delivered
    # to exactly one of them.
    share_pids=()
    for n in 0 2; do
        as_device_bg "$dev0" "$n" mosquitto_sub -i "share-$n" -t "\$share/probe/aloft/v1/d/$dev0/csr" \
            -q 1 -W 10 -C 10 >"$tmp/share-$n.out" 2>/dev/null &
        share_pids+=("$!")
    done
    sleep 2
    for i in $(seq 1 10); do
        as_device "$dev0" 1 mosquitto_pub -i pub -t "aloft/v1/d/$dev0/csr" -q 1 -m "m$i"
    done
    sleep 3
    share0=$(wc -l <"$tmp/share-0.out")
    share2=$(wc -l <"$tmp/share-2.out")
    check "a shared subscription across nodes 1 and 3 gets each message once (node 1: $share0, node 3: $share2)" \
        test $((share0 + share2)) -eq 10
    kill "${share_pids[@]}" 2>/dev/null || true
    wait "${share_pids[@]}" 2>/dev/null || true
fi

# --- The orchestrator(s) -----------------------------------------------------------------------
orch_pids=()
metrics=()
for r in $(seq 1 "$replicas"); do
    out="$tmp/serve-$r.out"
    # Replicas on different nodes: the shared subscription's members are spread too.
    node=$(((r - 1) % 3))
    RUST_LOG="${RUST_LOG:-warn}" "$aloft" serve --data-dir "$orch" \
        --broker "mqtts://127.0.0.1:${mqtt_ports[$node]}" --metrics-listen 127.0.0.1:0 \
        --replica-id "replica-$r" >"$out" 2>"$tmp/serve-$r.log" &
    pids+=("$!")
    orch_pids+=("$!")
    serve_started() { grep -q "metrics=" "$1" || ! kill -0 "$2"; }
    wait_for 120 "aloft serve (replica $r) to start" serve_started "$out" "$!"
    grep -q "metrics=" "$out" || {
        echo "aloft serve (replica $r) exited: $(tail -3 "$tmp/serve-$r.log")" >&2
        exit 1
    }
    metrics+=("$(grep -o 'metrics=[^ ]*' "$out" | head -1 | cut -d= -f2)")
done
link_up() { curl -sf "http://$1/metrics" | grep -q '^aloft_broker_link_up 1'; }
for m in "${metrics[@]}"; do
    wait_for 60 "the orchestrator's broker link ($m)" link_up "$m"
done
log "aloft serve: ${#orch_pids[@]} replica(s), metrics ${metrics[*]}"

ops() { "$aloft" "$@" --profile "$profile" --server "127.0.0.1:${mqtt_ports[0]}"; }
# Beside an external broker the orchestrator sees no handshake: devices are registered from
# their certificates, 250 to a request.
mapfile -t certs < <(find "$fleet/devices" -name '*.crt' | sort)
for ((i = 0; i < ${#certs[@]}; i += 250)); do
    args=()
    for c in "${certs[@]:i:250}"; do
        args+=(--cert "$c")
    done
    ops device register "${args[@]}" >/dev/null
done
log "${#certs[@]} devices registered"

# --- The fleet ---------------------------------------------------------------------------------
# Connections over the whole cluster (the HTTP API's sum of every node's stats).
connections() {
    local n
    n="$(api stats/sum | jq '.stats["connections.count"] // empty' 2>/dev/null || true)"
    echo "${n:-0}"
}
sessions_before=$(connections || echo 0)
fleet_start_ms=$(now_ms)
RUST_LOG="${RUST_LOG:-warn}" "$sim" run --dir "$fleet" --server "127.0.0.1:${mqtt_ports[0]}" \
    --server "127.0.0.1:${mqtt_ports[1]}" --server "127.0.0.1:${mqtt_ports[2]}" \
    >"$tmp/sim.out" 2>"$tmp/sim.log" &
pids+=("$!")
sim_pid=$!
all_connected() { (($(connections) >= sessions_before + devices)); }
wait_for "$timeout_secs" "every device to connect" all_connected
connect_ms=$(($(now_ms) - fleet_start_ms))
per_node=""
for n in 1 2 3; do
    per_node+=" node $n: $(api "nodes/$n" | jq '.connections')"
done
log "fleet connected in ${connect_ms} ms;$per_node"

# --- The campaign ------------------------------------------------------------------------------
head -c $((image_kib * 1024)) /dev/urandom >"$tmp/fw.bin"
"$aloft" release build --image "$tmp/fw.bin" --version 2.0.0 --security-version 2 \
    --hardware-model sim-v1 --key "$tmp/release.key" --out-dir "$tmp/bundle" >/dev/null
ops release upload --bundle "$tmp/bundle" >/dev/null
created_ms=$(now_ms)
campaign="$(ops campaign create --artifact fw-2.0.0 --all | jq -r .campaign)"
log "campaign $campaign created"
declare -A reached=()
deadline=$(($(date +%s) + timeout_secs))
while :; do
    s="$(ops campaign status --json "$campaign")"
    succeeded=$(jq '.counts.succeeded // 0' <<<"$s")
    status=$(jq -r .status <<<"$s")
    t=$(($(now_ms) - created_ms))
    for pct in 50 95 100; do
        if [[ -z "${reached[$pct]:-}" ]] && ((succeeded * 100 >= pct * devices)); then
            reached[$pct]=$t
        fi
    done
    [[ "$status" != active && "$status" != paused ]] && break
    if (($(date +%s) > deadline)); then
        log "campaign not finished within ${timeout_secs}s"
        break
    fi
    sleep 1
done
summary="$s"
# Each replica's share, from its /metrics: chunks it served, messages it wrote to the inbox.
metric() { curl -sf "http://$1/metrics" | awk -v m="$2" '$1 == m { printf "%d", $2 }'; }
shares=""
for ((r = 0; r < ${#metrics[@]}; r++)); do
    m="${metrics[$r]}"
    lead=""
    [[ "$(metric "$m" aloft_leader)" == 1 ]] && lead=" (leader)"
    shares+=" replica-$((r + 1))$lead: chunks $(metric "$m" aloft_chunks_served_total), inbox rows $(metric "$m" 'aloft_inbox_rows_total{op="written"}');"
done
rss_brokers=""
for n in 0 1 2; do
    rss_brokers+="$(peak_mib "${broker_pids[$n]}")/"
done
rss_orch=""
for p in "${orch_pids[@]}"; do
    rss_orch+="$(peak_mib "$p")/"
done

echo
echo "=== rmqttd cluster campaign: $devices devices, $replicas replica(s), ${image_kib} KiB ==="
echo "checks failed:        $failed_checks"
echo "campaign status:      $(jq -r .status <<<"$summary")"
echo "outcome:              $(jq -c .counts <<<"$summary")  reasons: $(jq -c .reasons <<<"$summary")"
echo "connect (all devices): ${connect_ms} ms;$per_node"
echo "campaign (orchestrator's created -> finished): $(jq '(.finished_ms // 0) - .created_ms' <<<"$summary") ms"
echo "succeeded 50% / 95% / 100% at (polled each 1 s): ${reached[50]:--} / ${reached[95]:--} / ${reached[100]:--} ms"
echo "replicas:            ${shares%;}"
echo "peak RSS MiB: rmqttd nodes ${rss_brokers%/}; aloft serve ${rss_orch%/}; device-sim $(peak_mib "$sim_pid")"
total=$(jq .total <<<"$summary")
ok=$(jq '.counts.succeeded // 0' <<<"$summary")
((failed_checks == 0 && ok == total && total == devices))
