//! Each broker's generated rules, read back by a small interpreter of its own format, must
//! answer a matrix of requests (a device on its own and another device's topics, wildcards,
//! retained jobs, admin requests; an operator; the orchestrator) exactly as the topic table
//! does, and so as the Mosquitto ACL does (retain apart, for the formats that cannot say it).
//! deploy/ must hold exactly what the generators write.

use super::*;

const DEV: &str = "dev-1";
const OPS: &str = "ops";

fn ops() -> Vec<OperatorId> {
    vec![OperatorId::new(OPS).unwrap()]
}

/// Does `pattern` (a filter with `+`/`#`) cover every topic `requested` (a topic, or a filter
/// a client subscribes with) can name?
fn covers(pattern: &str, requested: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let r: Vec<&str> = requested.split('/').collect();
    for (i, level) in p.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        let Some(req) = r.get(i) else { return false };
        if *req == "#" {
            return false;
        }
        if *level == "+" {
            continue;
        }
        if level != req {
            return false;
        }
    }
    p.len() == r.len()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Orchestrator,
    Device(&'static str),
    Operator(&'static str),
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Orchestrator => ORCHESTRATOR_COMMON_NAME,
            Who::Device(n) | Who::Operator(n) => n,
        }
    }
}

/// One request, and whether it is retained (publishes only).
type Request = (Who, Access, &'static str, bool);

fn root(t: &str) -> String {
    if t == "#" || t.starts_with("aloft") {
        t.to_owned()
    } else {
        format!("{}/{t}", topics::ROOT)
    }
}

fn matrix() -> Vec<Request> {
    use Who::{Device as Dv, Operator as Op, Orchestrator as Or};
    vec![
        (Dv(DEV), P, "d/dev-1/status", false),
        (Dv(DEV), P, "d/dev-1/chunk/req", false),
        (Dv(DEV), P, "d/dev-1/csr", false),
        (Dv(DEV), P, "d/dev-1/status", true),
        (Dv(DEV), P, "d/dev-2/status", false),
        (Dv(DEV), P, "d/dev-2/chunk/req", false),
        (Dv(DEV), P, "d/dev-1/job", false),
        (Dv(DEV), P, "d/dev-1/job", true),
        (Dv(DEV), P, "d/dev-2/job", true),
        (Dv(DEV), P, "d/dev-1/ack", false),
        (Dv(DEV), P, "d/dev-1/cert", false),
        (Dv(DEV), P, "d/dev-1/chunk/resp", false),
        (Dv(DEV), P, "manifests/fw-1", true),
        (Dv(DEV), P, "admin/ops/campaign_create", false),
        (Dv(DEV), P, "admin/dev-1/campaign_create", false),
        (Dv(DEV), P, "o/ops/reply", false),
        (Dv(DEV), S, "d/dev-1/#", false),
        (Dv(DEV), S, "manifests/#", false),
        (Dv(DEV), S, "d/dev-2/#", false),
        (Dv(DEV), S, "d/+/job", false),
        (Dv(DEV), S, "d/+/chunk/resp", false),
        (Dv(DEV), S, "#", false),
        (Dv(DEV), S, "aloft/#", false),
        (Dv(DEV), S, "aloft/v1/#", false),
        (Dv(DEV), S, "admin/#", false),
        (Dv(DEV), S, "o/ops/reply", false),
        (Op(OPS), P, "admin/ops/campaign_create", false),
        (Op(OPS), P, "admin/other/campaign_create", false),
        (Op(OPS), P, "d/dev-1/job", true),
        (Op(OPS), P, "d/dev-1/status", false),
        (Op(OPS), P, "o/ops/reply", false),
        (Op(OPS), S, "o/ops/reply", false),
        (Op(OPS), S, "o/other/reply", false),
        (Op(OPS), S, "admin/#", false),
        (Op(OPS), S, "d/dev-1/#", false),
        (Op(OPS), S, "#", false),
        (Or, P, "d/dev-1/job", true),
        (Or, P, "d/dev-1/ack", false),
        (Or, P, "d/dev-1/chunk/resp", false),
        (Or, P, "d/dev-1/cert", false),
        (Or, P, "manifests/fw-1", true),
        (Or, P, "o/ops/reply", false),
        (Or, P, "d/dev-1/status", false),
        (Or, P, "admin/ops/campaign_create", false),
        (Or, S, "d/+/status", false),
        (Or, S, "d/+/chunk/req", false),
        (Or, S, "d/+/csr", false),
        (Or, S, "admin/#", false),
        (Or, S, "d/+/job", false),
        (Or, S, "#", false),
    ]
}

/// The answer of the table itself.
fn table_allows((who, access, topic, retain): Request) -> bool {
    let (principal, name) = match who {
        Who::Orchestrator => (X, ""),
        Who::Device(n) => (D, n),
        Who::Operator(n) => (O, n),
    };
    grants(principal, access)
        .any(|g| covers(&full(g.filter, name), &root(topic)) && (!retain || g.retain))
}

/// A Mosquitto-format ACL (Mosquitto, VerneMQ): the user's own block and every pattern.
/// Retain is not part of the format: `retain` is ignored.
fn mosquitto_allows(acl: &str, (who, access, topic, _retain): Request) -> bool {
    let want = match access {
        P => "write",
        S => "read",
    };
    let mut user: Option<&str> = None;
    for line in acl.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["user", u] => user = Some(u),
            ["topic", rw, filter]
                if user == Some(who.name())
                    && (*rw == want || *rw == "readwrite")
                    && covers(filter, &root(topic)) =>
            {
                return true;
            }
            ["pattern", rw, filter] => {
                let f = filter.replace("%u", who.name());
                if (*rw == want || *rw == "readwrite") && covers(&f, &root(topic)) {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// EMQX's `acl.conf`, as this generator writes it: first matching rule wins.
fn emqx_allows(acl: &str, (who, access, topic, retain): Request) -> bool {
    let mut t = root(topic);
    if who == Who::Orchestrator && access == S {
        t = format!("$share/{SHARE_GROUP}/{t}");
    }
    for line in acl.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        if line == "{deny, all}." {
            return false;
        }
        let allow = line.starts_with("{allow,");
        let body = line
            .trim_start_matches("{allow, ")
            .trim_start_matches("{deny, ");
        let (applies, rest) = if let Some(r) = body.strip_prefix("all, ") {
            (true, r)
        } else if let Some(r) = body.strip_prefix("{username, \"") {
            let (u, r) = r.split_once("\"}, ").unwrap();
            (u == who.name(), r)
        } else {
            panic!("unreadable rule {line}");
        };
        if !applies {
            continue;
        }
        let (action, list) = rest.rsplit_once(", [").unwrap();
        let action_ok = match action {
            "all" => true,
            "subscribe" => access == S,
            "publish" => access == P,
            "{publish, [{retain, false}]}" => access == P && !retain,
            other => panic!("unknown action {other}"),
        };
        let filters: Vec<String> = list
            .trim_end_matches("]}.")
            .split(", ")
            .map(|f| f.trim_matches('"').replace("${username}", who.name()))
            .collect();
        // The orchestrator's rules name its filters with the `$share/aloft/` prefix too.
        let matched = filters.iter().any(|f| covers(f, &t));
        if action_ok && matched {
            return allow;
        }
    }
    false
}

/// The HiveMQ File RBAC `credentials.xml`: a listed user's roles, else (a device) `device`.
fn hivemq_allows(xml: &str, (who, access, topic, retain): Request) -> bool {
    let between = |s: &str, open: &str, close: &str| -> Vec<String> {
        s.split(open)
            .skip(1)
            .filter_map(|p| p.split_once(close).map(|(a, _)| a.to_owned()))
            .collect()
    };
    let mut role = "device".to_owned();
    for user in between(xml, "<user>", "</user>") {
        if between(&user, "<name>", "</name>")[0] == who.name() {
            role = between(&user, "<id>", "</id>")[0].clone();
        }
    }
    for r in between(xml, "<role>", "</role>") {
        if between(&r, "<id>", "</id>")[0] != role {
            continue;
        }
        for p in between(&r, "<permission>", "</permission>") {
            let filter = between(&p, "<topic>", "</topic>")[0].replace("${{username}}", who.name());
            let activity = between(&p, "<activity>", "</activity>")[0].clone();
            let retain_ok = between(&p, "<retain>", "</retain>")[0] != "NOT_RETAINED" || !retain;
            let activity_ok = match access {
                P => activity == "PUBLISH" || activity == "ALL",
                S => activity == "SUBSCRIBE" || activity == "ALL",
            };
            if activity_ok && retain_ok && covers(&filter, &root(topic)) {
                return true;
            }
        }
    }
    false
}

/// An AWS IoT Core policy: resources are globs (`*`), topic filters match literally.
fn aws_allows(policies: &[(String, String)], (who, access, topic, retain): Request) -> bool {
    let arn = "arn:aws:iot:eu-west-1:123456789012";
    let name = match who {
        Who::Orchestrator => "orchestrator".to_owned(),
        Who::Device(_) => "device".to_owned(),
        Who::Operator(n) => format!("operator-{n}"),
    };
    let Some((_, doc)) = policies.iter().find(|(n, _)| *n == name) else {
        return false;
    };
    let doc: serde_json::Value = serde_json::from_str(doc).unwrap();
    let glob = |pattern: &str, s: &str| -> bool {
        // `*` matches any run of characters, as in IAM resources.
        let parts: Vec<&str> = pattern.split('*').collect();
        let mut rest = s;
        for (i, part) in parts.iter().enumerate() {
            if i == 0 {
                let Some(r) = rest.strip_prefix(part) else {
                    return false;
                };
                rest = r;
            } else if i == parts.len() - 1 {
                return rest.ends_with(part);
            } else {
                let Some(at) = rest.find(part) else {
                    return false;
                };
                rest = &rest[at + part.len()..];
            }
        }
        rest.is_empty()
    };
    let allowed = |action: &str, resource: &str| -> bool {
        doc["Statement"].as_array().unwrap().iter().any(|st| {
            st["Effect"] == "Allow"
                && st["Action"] == action
                && match &st["Resource"] {
                    serde_json::Value::String(r) => vec![r.clone()],
                    serde_json::Value::Array(a) => {
                        a.iter().map(|r| r.as_str().unwrap().to_owned()).collect()
                    }
                    _ => vec![],
                }
                .iter()
                .any(|r| glob(&r.replace(AWS_THING, who.name()), resource))
        })
    };
    let t = root(topic);
    match access {
        P => {
            allowed("iot:Publish", &format!("{arn}:topic/{t}"))
                && (!retain || allowed("iot:RetainPublish", &format!("{arn}:topic/{t}")))
        }
        S => {
            let filter = match who {
                Who::Orchestrator => format!("$share/{SHARE_GROUP}/{t}"),
                _ => t.clone(),
            };
            // Literal match: a `+` or `#` in the request must be in the resource as written.
            allowed("iot:Subscribe", &format!("{arn}:topicfilter/{filter}"))
        }
    }
}

/// rmqtt-acl's matching of a requested topic or filter against a rule's filter (its topic
/// trie): `#` in the rule takes the rest (none included), `+` any one level of the request
/// (a `+` or `#` in it too), any other level only itself.
fn rmqtt_trie_matches(rule: &[&str], requested: &[&str]) -> bool {
    match (rule.split_first(), requested.split_first()) {
        (Some((&"#", _)), _) => true,
        (None, None) => true,
        (Some((&"+", r)), Some((_, q))) => rmqtt_trie_matches(r, q),
        (Some((l, r)), Some((m, q))) => l == m && rmqtt_trie_matches(r, q),
        _ => false,
    }
}

/// rmqttd's `rmqtt-acl.toml` as the plugin reads it: the first rule whose control covers the
/// request, whose users all match the client and whose topics match decides; no match refuses.
/// A rule without topics matches every topic; `%u` is the client's user name (its CN).
/// Retain is not part of the format: `retain` is ignored.
fn rmqtt_allows(acl: &str, (who, access, topic, _retain): Request) -> bool {
    let doc: toml::Value = toml::from_str(acl).unwrap();
    let t = root(topic);
    let requested: Vec<&str> = t.split('/').collect();
    for rule in doc["rules"].as_array().unwrap() {
        let rule = rule.as_array().unwrap();
        let allow = match rule[0].as_str().unwrap() {
            "allow" => true,
            "deny" => false,
            other => panic!("unknown access {other}"),
        };
        let users_match = match &rule[1] {
            toml::Value::String(s) if s == "all" => true,
            toml::Value::Table(t) => {
                assert_eq!(t.len(), 1, "only user conditions are generated: {t:?}");
                t["user"].as_str().unwrap() == who.name()
            }
            other => panic!("unknown user {other:?}"),
        };
        let control = rule.get(2).map_or("all", |c| c.as_str().unwrap());
        let control_match = match control {
            "all" | "pubsub" => true,
            "publish" => access == P,
            "subscribe" => access == S,
            "connect" => false,
            other => panic!("unknown control {other}"),
        };
        let topics_match = match rule.get(3) {
            None => true,
            Some(list) => list.as_array().unwrap().iter().any(|f| {
                let f = f.as_str().unwrap().replace("%u", who.name());
                rmqtt_trie_matches(&f.split('/').collect::<Vec<_>>(), &requested)
            }),
        };
        if users_match && control_match && topics_match {
            return allow;
        }
    }
    false
}

fn check(name: &str, allows: impl Fn(Request) -> bool) {
    for req in matrix() {
        assert_eq!(
            allows(req),
            table_allows(req),
            "{name} disagrees with the topic table on {req:?}"
        );
    }
}

#[test]
fn the_topic_table_gives_a_device_only_its_own_requests_and_subtree() {
    let allowed: Vec<Request> = matrix().into_iter().filter(|r| table_allows(*r)).collect();
    for (who, access, topic, retain) in &allowed {
        if let Who::Device(d) = who {
            assert!(!retain, "a device may retain {topic}");
            match access {
                P => assert!(topic.starts_with(&format!("d/{d}/"))),
                S => assert!(topic.starts_with(&format!("d/{d}/")) || *topic == "manifests/#"),
            }
        }
    }
    // Only the orchestrator may publish what devices obey.
    for (who, access, topic, _) in &allowed {
        if *access == P && (topic.ends_with("/job") || topic.ends_with("/chunk/resp")) {
            assert_eq!(*who, Who::Orchestrator, "{topic}");
        }
    }
}

#[test]
fn the_mosquitto_acl_answers_like_the_table_apart_from_retain() {
    let acl = crate::broker_config::mosquitto_acl(&ops());
    for req in matrix() {
        // Mosquitto's ACL cannot say "not retained": a device may retain on its own request
        // topics (SECURITY.md); everything else agrees.
        let (who, access, topic, retain) = req;
        if retain && matches!(who, Who::Device(_)) && table_allows((who, access, topic, false)) {
            assert!(mosquitto_allows(&acl, req));
            continue;
        }
        assert_eq!(mosquitto_allows(&acl, req), table_allows(req), "{req:?}");
    }
}

#[test]
fn vernemq_rules_are_the_mosquitto_acl() {
    let v = vernemq_acl(&ops());
    let m = crate::broker_config::mosquitto_acl(&ops());
    let rules = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rules(&v), rules(&m));
}

#[test]
fn rmqtt_rules_answer_like_the_table_apart_from_retain() {
    let acl = rmqtt_acl(&ops());
    for req in matrix() {
        // As Mosquitto's, rmqtt-acl's rules cannot say "not retained" (SECURITY.md).
        let (who, access, topic, retain) = req;
        if retain && matches!(who, Who::Device(_)) && table_allows((who, access, topic, false)) {
            assert!(rmqtt_allows(&acl, req));
            continue;
        }
        assert_eq!(rmqtt_allows(&acl, req), table_allows(req), "{req:?}");
    }
}

#[test]
fn rmqtt_lets_every_client_connect_first_and_ends_with_a_refusal() {
    let acl = rmqtt_acl(&ops());
    let doc: toml::Value = toml::from_str(&acl).unwrap();
    let rules = doc["rules"].as_array().unwrap();
    // rmqtt-acl also decides CONNECTs with the first matching rule: a rule before this one
    // that denies "all" of a user would keep that user out.
    assert_eq!(rules[0].as_array().unwrap()[2].as_str(), Some("connect"));
    assert_eq!(
        rules.last().unwrap().as_array().unwrap().len(),
        2,
        "the last rule denies everything"
    );
    assert_eq!(doc["disconnect_if_pub_rejected"].as_bool(), Some(false));
}

#[test]
fn rmqtt_trie_matching_takes_a_requested_wildcard_literally() {
    let m = |rule: &str, req: &str| {
        rmqtt_trie_matches(
            &rule.split('/').collect::<Vec<_>>(),
            &req.split('/').collect::<Vec<_>>(),
        )
    };
    assert!(m("a/d/x/#", "a/d/x/#"));
    assert!(m("a/d/x/#", "a/d/x"));
    assert!(m("a/d/+/s", "a/d/+/s"));
    assert!(!m("a/d/x/#", "a/d/+/job"));
    assert!(!m("a/d/x/#", "#"));
    assert!(!m("a/d/+/s", "a/d/#"));
}

#[test]
fn emqx_rules_answer_like_the_table() {
    let acl = emqx_acl(&ops());
    check("emqx", |r| emqx_allows(&acl, r));
}

#[test]
fn hivemq_rules_answer_like_the_table() {
    let xml = hivemq_rbac(&ops());
    check("hivemq", |r| hivemq_allows(&xml, r));
}

#[test]
fn aws_iot_policies_answer_like_the_table_and_bind_the_client_id_to_the_thing() {
    let p = aws_iot_policies("arn:aws:iot:eu-west-1:123456789012", &ops());
    check("aws-iot", |r| aws_allows(&p, r));
    let device: serde_json::Value = serde_json::from_str(&p[0].1).unwrap();
    assert_eq!(
        device["Statement"][0]["Resource"],
        format!("arn:aws:iot:eu-west-1:123456789012:client/{AWS_THING}")
    );
    assert_eq!(
        device["Statement"][0]["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"],
        "true"
    );
    assert!(
        !p[0].1.contains("iot:RetainPublish"),
        "devices never retain"
    );
    // The orchestrator connects under the client id the server uses, or a replica's.
    let orch: serde_json::Value = serde_json::from_str(&p[1].1).unwrap();
    assert_eq!(
        orch["Statement"][0]["Resource"],
        serde_json::json!([
            format!("arn:aws:iot:eu-west-1:123456789012:client/{ORCHESTRATOR_CLIENT_ID}"),
            format!("arn:aws:iot:eu-west-1:123456789012:client/{ORCHESTRATOR_CLIENT_ID}-*"),
        ])
    );
}

#[test]
fn the_broker_settings_require_a_fleet_certificate_over_tls_13() {
    let e = emqx_conf("/etc/emqx/aloft", 8883);
    for l in [
        "verify = verify_peer",
        "fail_if_no_peer_cert = true",
        "versions = [\"tlsv1.3\"]",
        "mqtt.peer_cert_as_username = cn",
        "no_match = deny",
    ] {
        assert!(e.contains(l), "emqx: {l}");
    }
    // Both listeners require a fleet certificate; only the services' one leaves client ids
    // free, for replicas sharing the orchestrator's certificate.
    assert_eq!(e.matches("fail_if_no_peer_cert = true").count(), 2);
    assert!(e.contains("bind = \"0.0.0.0:8884\"\n  zone = aloft_services"));
    assert!(e.contains("zones.aloft_services.mqtt.peer_cert_as_clientid = disabled"));
    assert!(e.contains("\nmqtt.peer_cert_as_clientid = cn"));
    let v = vernemq_conf("/etc/vernemq/aloft", 8883);
    for l in [
        "listener.ssl.require_certificate = on",
        "listener.ssl.use_identity_as_username = on",
        "listener.ssl.crlfile = /etc/vernemq/aloft/crl.pem",
        "listener.tcp.default = off",
    ] {
        assert!(v.lines().any(|x| x == l), "vernemq: {l}");
    }
    let h = hivemq_config("/opt/hivemq/aloft", 8883);
    assert!(h.contains("<client-authentication-mode>REQUIRED</client-authentication-mode>"));
    assert!(h.contains("<protocol>TLSv1.3</protocol>"));
    // rmqttd offers TLS 1.2 too (no setting for the version): the certificate is required.
    let r: toml::Value = toml::from_str(&rmqtt_conf(
        "/etc/rmqtt/aloft",
        "0.0.0.0:8883".parse().unwrap(),
    ))
    .unwrap();
    let tls = &r["listener"]["tls"]["external"];
    assert_eq!(tls["cross_certificate"].as_bool(), Some(true));
    assert_eq!(
        tls["client_ca_certs"].as_str(),
        Some("/etc/rmqtt/aloft/ca.crt")
    );
    assert_eq!(tls["cert_cn_as_username"].as_bool(), Some(true));
    assert_eq!(tls["allow_anonymous"].as_bool(), Some(false));
    assert!(r["listener"].get("tcp").is_none(), "no plain listener");
    let startups = r["plugins"]["default_startups"].as_array().unwrap();
    for p in ["rmqtt-acl", "rmqtt-retainer", "rmqtt-shared-subscription"] {
        assert!(startups.iter().any(|s| s.as_str() == Some(p)), "{p}");
    }
    let retainer: toml::Value = toml::from_str(&rmqtt_retainer("/etc/rmqtt/aloft")).unwrap();
    assert_eq!(retainer["retained_message_ttl"].as_str(), Some("0m"));
}

/// deploy/ is what the generators write for `/etc/<broker>/aloft`, port 8883 and operator
/// `ops`: `aloft broker-config` and the checked-in files cannot drift apart.
#[test]
fn deploy_holds_exactly_what_the_generators_write() {
    for (path, text) in deploy_files() {
        let on_disk = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(&path),
        )
        .unwrap_or_default();
        assert!(
            on_disk == text,
            "{path} differs from the generator; regenerate with ALOFT_WRITE_DEPLOY=1 cargo test -p aloft-orchestrator deploy_holds"
        );
    }
}

fn deploy_files() -> Vec<(String, String)> {
    let mut v = vec![
        ("deploy/emqx/acl.conf".to_owned(), emqx_acl(&ops())),
        (
            "deploy/emqx/emqx.conf".to_owned(),
            emqx_conf("/etc/emqx/aloft", 8883),
        ),
        ("deploy/vernemq/vmq.acl".to_owned(), vernemq_acl(&ops())),
        (
            "deploy/vernemq/vernemq.conf".to_owned(),
            vernemq_conf("/etc/vernemq/aloft", 8883),
        ),
        (
            "deploy/hivemq/config.xml".to_owned(),
            hivemq_config("/opt/hivemq/aloft", 8883),
        ),
        (
            "deploy/hivemq/credentials.xml".to_owned(),
            hivemq_rbac(&ops()),
        ),
        (
            "deploy/rmqtt/rmqtt.toml".to_owned(),
            rmqtt_conf("/etc/rmqtt/aloft", "0.0.0.0:8883".parse().unwrap()),
        ),
        (
            "deploy/rmqtt/plugins/rmqtt-acl.toml".to_owned(),
            rmqtt_acl(&ops()),
        ),
        (
            "deploy/rmqtt/plugins/rmqtt-retainer.toml".to_owned(),
            rmqtt_retainer("/etc/rmqtt/aloft"),
        ),
        (
            "deploy/rmqtt/plugins/rmqtt-shared-subscription.toml".to_owned(),
            rmqtt_shared_subscription(),
        ),
    ];
    for (name, doc) in aws_iot_policies("arn:aws:iot:REGION:ACCOUNT", &ops()) {
        v.push((format!("deploy/aws-iot/{name}-policy.json"), doc));
    }
    if std::env::var_os("ALOFT_WRITE_DEPLOY").is_some() {
        for (path, text) in &v {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }
    v
}
