//! The `aloft` binary as a script or a reader sees it: what goes to stdout and to stderr, and
//! what `--help` says. (Also why cargo builds `aloft` whenever the workspace's tests are built:
//! tests/readme.rs runs it.)

use std::path::Path;
use std::process::{Command, Output};

use aloft_orchestrator::cli::Cli;
use clap::CommandFactory;

fn aloft<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_aloft"))
        .args(args)
        .env_remove("ALOFT_UNLOCK")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn keygen_prints_the_public_key_alone_on_stdout_and_the_recovery_key_labeled_on_stderr() {
    for role in ["trust", "release"] {
        let dir = tempfile::tempdir().unwrap();
        let key: &Path = &dir.path().join("k.key");
        let out = aloft([
            role.as_ref(),
            "keygen".as_ref(),
            "--out".as_ref(),
            key.as_os_str(),
            "--no-passphrase".as_ref(),
        ]);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        let recovery = stderr
            .lines()
            .find_map(|l| l.strip_prefix("recovery key: "))
            .unwrap_or_else(|| panic!("`{role} keygen` showed no labeled recovery key: {stderr}"));
        assert!(
            !stdout.contains(recovery),
            "the recovery key reached stdout"
        );
        let unlock = aloft_vault::Unlock::parse(recovery).unwrap();
        let signing = aloft_orchestrator::ops::read_signing_key(key, &unlock).unwrap();
        assert_eq!(
            stdout,
            format!("{}\n", signing.public().to_hex()),
            "`{role} keygen` stdout must be the public key alone"
        );
    }
}

#[test]
fn every_subcommand_answers_help_with_its_own_about_line() {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            path.push(sub.get_name().to_owned());
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            out.push((path.clone(), about));
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut all = Vec::new();
    walk(&Cli::command(), &mut Vec::new(), &mut all);
    for (path, about) in all {
        let out = aloft(path.iter().map(String::as_str).chain(["--help"]));
        let help = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            help.lines().next(),
            Some(about.as_str()),
            "`aloft {} --help`",
            path.join(" ")
        );
    }
}

/// A command that fails: its stderr.
fn aloft_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_aloft"))
        .args(args)
        .env_remove("ALOFT_SERVER")
        .env_remove("ALOFT_PROFILE")
        .output()
        .unwrap();
    assert!(!out.status.success(), "it succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_server_without_a_port_is_refused_with_the_cause_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().to_str().unwrap();
    for cmd in [
        &["device", "list"][..],
        &["campaign", "list"],
        &["release", "list"],
    ] {
        let err =
            aloft_fails(
                cmd.iter()
                    .copied()
                    .chain(["--profile", profile, "--server", "localhost"]),
            );
        assert!(
            err.contains(
                "--server \"localhost\" is not host:port: it has no port; write localhost:8883"
            ),
            "{err}"
        );
    }
}

#[test]
fn ambiguous_policy_numbers_are_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().to_str().unwrap();
    let base = [
        "campaign",
        "create",
        "--artifact",
        "fw-2",
        "--all",
        "--profile",
        profile,
    ];
    let err = aloft_fails(base.iter().copied().chain(["--waves", "10,50,100"]));
    assert!(err.contains("write --waves 10%,50%,100%"), "{err}");
    let err = aloft_fails(base.iter().copied().chain(["--pause-at", "1:5"]));
    assert!(err.contains("a share takes %"), "{err}");
}

#[test]
fn console_token_prints_a_viewer_link_that_this_data_directory_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = aloft([
        "init".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--no-passphrase".as_ref(),
    ]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let recovery = stderr
        .lines()
        .find_map(|l| l.strip_prefix("recovery key: "))
        .unwrap()
        .to_owned();
    let unlock_file = dir.path().join("unlock");
    std::fs::write(&unlock_file, &recovery).unwrap();
    let args = |ttl: &str| -> Vec<std::ffi::OsString> {
        vec![
            "console".into(),
            "token".into(),
            "--data-dir".into(),
            data.clone().into(),
            "--unlock-file".into(),
            unlock_file.clone().into(),
            "--ttl".into(),
            ttl.into(),
            "--url".into(),
            "https://ota.example:9443/".into(),
        ]
    };
    let out = aloft(args("10m"));
    let link = String::from_utf8(out.stdout).unwrap();
    let token = link
        .trim_end()
        .strip_prefix("https://ota.example:9443/login?token=")
        .unwrap_or_else(|| panic!("{link:?}"));
    let unlock = aloft_vault::Unlock::parse(&recovery).unwrap();
    let key = aloft_orchestrator::console::TokenKey::derive(
        &aloft_orchestrator::ops::open_keystore(&data, &unlock).unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = key.check(token, now).unwrap();
    assert!(
        expires <= now + 600 && expires + 60 >= now + 600,
        "{expires} vs {now}"
    );
    // Longer than a day is refused before anything is opened.
    let err = aloft_fails(args("25h"));
    assert!(err.contains("--ttl must be between 1s and 24h"), "{err}");
}
