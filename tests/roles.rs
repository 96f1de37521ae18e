//! Operator roles (1.5) through the real admin path: every admin operation sent by a viewer, an
//! operator and a security admin over mTLS, each with a certificate of that role. A role below
//! the operation's is refused `forbidden`, audited and counted; a role at or above it gets past
//! the check (the operation may still fail on its own terms, which is not this test's concern).

use aloft_certs::OperatorRole;
use aloft_e2e::ReleaseSpec;
use aloft_orchestrator::admin::client::{AdminClient, ClientError};
use aloft_orchestrator::admin::wire::AdminBody;
use serde_json::{json, Value};

use crate::common::{read_bundle, Env};

/// What each operation needs, as PROTOCOL.md §11.7 lists it, with a body that decodes.
fn table(manifest: Value) -> Vec<(OperatorRole, Value)> {
    use OperatorRole::*;
    let c = "c-1-000000000000";
    vec![
        (Viewer, json!({"op": "release_list"})),
        (Viewer, json!({"op": "trust_status"})),
        (Viewer, json!({"op": "device_list"})),
        (Viewer, json!({"op": "device_count"})),
        (Viewer, json!({"op": "campaign_status", "campaign": c})),
        (Viewer, json!({"op": "campaign_list"})),
        (Viewer, json!({"op": "audit_list"})),
        (
            Operator,
            json!({"op": "release_put", "manifest": manifest, "content_key": "00"}),
        ),
        (
            Operator,
            json!({"op": "release_chunk", "artifact": "fw-9.9.9", "index": 0, "data": ""}),
        ),
        (
            Operator,
            json!({"op": "device_label", "devices": ["dev-00000"], "set": {"site": "a"}}),
        ),
        (
            Operator,
            json!({"op": "campaign_create", "artifact": "fw-9.9.9", "target": "all"}),
        ),
        (Operator, json!({"op": "campaign_pause", "campaign": c})),
        (Operator, json!({"op": "campaign_resume", "campaign": c})),
        (Operator, json!({"op": "campaign_abort", "campaign": c})),
        (
            Operator,
            json!({"op": "campaign_rollback", "campaign": c, "to": "fw-9.9.9"}),
        ),
        (SecurityAdmin, json!({"op": "trust_update", "roots": []})),
        (
            SecurityAdmin,
            json!({"op": "crl_update", "crl": "not a crl"}),
        ),
        (SecurityAdmin, json!({"op": "device_register", "certs": []})),
        (
            SecurityAdmin,
            json!({"op": "device_renew_allow", "device": "dev-00000"}),
        ),
    ]
}

async fn client_with_role(env: &Env, role: OperatorRole) -> AdminClient {
    let name = format!("role-{}", role.as_str());
    let dir = env.lab.root.join(&name);
    aloft_orchestrator::ops::issue_operator_profile(
        &env.lab.ca,
        &aloft_proto::OperatorId::new(name.as_str()).unwrap(),
        role,
        &dir,
        1,
    )
    .unwrap();
    AdminClient::connect(&dir, &env.running.device_addr.to_string())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_operation_is_checked_against_the_certificates_role() {
    let env = Env::new(1).await;
    let bundle = env
        .lab
        .build_release(&ReleaseSpec::new("3.0.0", 1, 4096))
        .unwrap();
    let (manifest, _) = read_bundle(&bundle);
    let table = table(serde_json::to_value(&manifest).unwrap());
    // Every operation of the protocol is in the table.
    let ops: std::collections::BTreeSet<String> = table
        .iter()
        .map(|(_, b)| b["op"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ops.len(), 19, "one row per admin operation");

    let mut forbidden = 0;
    for role in OperatorRole::ALL {
        let client = client_with_role(&env, role).await;
        for (needed, body) in &table {
            let op = body["op"].as_str().unwrap();
            let body: AdminBody = serde_json::from_value(body.clone()).unwrap();
            assert_eq!(body.required_role(), *needed, "{op}");
            let answer = client.call::<Value>(body).await;
            let refused_for_role =
                matches!(&answer, Err(ClientError::Refused(e)) if e.code == "forbidden");
            assert_eq!(
                refused_for_role,
                !role.allows(*needed),
                "{op} by a {role}: {answer:?}"
            );
            if refused_for_role {
                forbidden += 1;
                assert!(env.running.metrics.admin_forbidden_count(op, role.as_str()) >= 1);
            }
        }
        client.disconnect().await;
    }
    // viewer: 8 + 4 refused; operator: 4 refused; security admin: none.
    assert_eq!(forbidden, 16);

    // Each refusal is in the audit log, under the operator that asked.
    let audit: Value = env
        .admin
        .call(AdminBody::AuditList {
            since: None,
            limit: Some(1000),
        })
        .await
        .unwrap();
    let refused: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "forbidden")
        .collect();
    assert_eq!(refused.len(), 16);
    assert!(refused
        .iter()
        .any(|e| e["actor"] == "role-viewer" && e["action"] == "crl_update"));
    assert!(refused.iter().all(|e| e["actor"] != "role-security-admin"));
}
