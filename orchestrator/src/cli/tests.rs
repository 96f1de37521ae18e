//! The command line's own shape: what `--help` says of each subcommand.

use std::collections::HashMap;

use clap::CommandFactory;

use super::Cli;

/// Every subcommand under `cmd`, by its path (`device list`), except clap's own `help`.
fn subcommands(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let path = format!("{path} {}", sub.get_name()).trim().to_owned();
        out.push((path.clone(), sub.clone()));
        subcommands(sub, &path, out);
    }
}

#[test]
fn every_subcommand_describes_itself_in_its_own_words() {
    let cli = Cli::command();
    cli.clone().debug_assert();
    let mut all = Vec::new();
    subcommands(&cli, "", &mut all);
    assert!(all.len() > 40, "only {} subcommands found", all.len());
    // A flattened argument struct's doc comment once stood in for the about text of every
    // subcommand that had none (`device list`: "How an operator command reaches the
    // orchestrator"); such borrowed text shows up as the same about under several names.
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (path, cmd) in &all {
        let about = cmd
            .get_about()
            .map(|a| a.to_string())
            .unwrap_or_else(|| panic!("`aloft {path} --help` has no about text"));
        assert!(
            !about.trim().is_empty(),
            "`aloft {path}` has an empty about"
        );
        if let Some(other) = seen.insert(about.clone(), path) {
            panic!("`aloft {path}` and `aloft {other}` both say {about:?}");
        }
    }
}

#[test]
fn every_argument_of_every_subcommand_says_what_it_does() {
    let cli = Cli::command();
    let mut all = Vec::new();
    subcommands(&cli, "", &mut all);
    let mut missing = Vec::new();
    for (path, cmd) in &all {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg
                .get_help()
                .is_none_or(|h| h.to_string().trim().is_empty())
            {
                missing.push(format!("aloft {path} --{id}"));
            }
        }
    }
    assert!(missing.is_empty(), "arguments without help: {missing:#?}");
}
