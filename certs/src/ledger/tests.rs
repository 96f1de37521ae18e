use std::io::Write;

use aloft_proto::DeviceId;

use super::*;
use crate::revocation::{revoke_device, RevocationReason, RevocationState};
use crate::{FleetCa, Validity};

fn issue(ca: &FleetCa, id: &str, x25519: [u8; 32]) -> (String, String) {
    let id = DeviceId::new(id).unwrap();
    let csr = crate::device_csr(&id, &x25519).unwrap();
    let cert = ca.issue_device(&csr.csr_pem, Validity::days(30)).unwrap();
    (cert, csr.key_pem)
}

#[test]
fn revoking_a_device_by_one_certificate_revokes_every_certificate_the_ledger_records_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = FleetCa::create("t", 30).unwrap();
    let (first, key) = issue(&ca, "dev-1", [1; 32]);
    let (other, _) = issue(&ca, "dev-2", [2; 32]);
    record_certs(dir.path(), &[&first, &other]).unwrap();
    // A renewal on the server: same id, same x25519 key, a new serial.
    let me = DeviceId::new("dev-1").unwrap();
    let csr = crate::device_renewal_csr(&me, &[1; 32], &key).unwrap();
    let renewed = ca
        .renew_device(&csr.csr_pem, &me, &[1; 32], Validity::days(30))
        .unwrap();
    record_certs(dir.path(), &[&renewed]).unwrap();

    let serial = crate::cert_serial(&first).unwrap();
    let done = revoke_device(
        dir.path(),
        &me,
        Some(&serial),
        RevocationReason::KeyCompromise,
        7,
    )
    .unwrap();
    assert_eq!(done.newly.len(), 2);
    let state = RevocationState::load(dir.path()).unwrap();
    assert!(state.is_revoked(&crate::cert_serial(&first).unwrap()));
    assert!(state.is_revoked(&crate::cert_serial(&renewed).unwrap()));
    assert!(!state.is_revoked(&crate::cert_serial(&other).unwrap()));
    // Again: nothing new.
    let again = revoke_device(dir.path(), &me, None, RevocationReason::KeyCompromise, 8).unwrap();
    assert_eq!((again.newly.len(), again.already), (0, 2));
}

#[test]
fn a_torn_last_line_is_ignored_and_cut_off_by_the_next_append_but_a_bad_line_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = FleetCa::create("t", 30).unwrap();
    let (a, _) = issue(&ca, "dev-1", [1; 32]);
    let (b, _) = issue(&ca, "dev-2", [2; 32]);
    record_certs(dir.path(), &[&a]).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path(dir.path()))
        .unwrap();
    f.write_all(br#"{"device":"dev-9","ser"#).unwrap();
    drop(f);
    assert_eq!(read(dir.path()).unwrap().len(), 1);
    record_certs(dir.path(), &[&b]).unwrap();
    let entries = read(dir.path()).unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| e.device.as_str())
            .collect::<Vec<_>>(),
        ["dev-1", "dev-2"]
    );

    std::fs::write(path(dir.path()), "not json\n").unwrap();
    assert!(matches!(read(dir.path()), Err(PkiError::Ledger(_))));
    assert!(serials_of(dir.path(), &DeviceId::new("dev-1").unwrap()).is_err());
}

#[test]
fn only_device_certificates_go_into_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ca = FleetCa::create("t", 30).unwrap();
    let op = ca
        .issue_operator(
            &aloft_proto::OperatorId::new("ops").unwrap(),
            crate::OperatorRole::Operator,
            Validity::days(1),
        )
        .unwrap();
    assert!(record_certs(dir.path(), &[&op.cert_pem]).is_err());
    assert!(read(dir.path()).unwrap().is_empty());
}
