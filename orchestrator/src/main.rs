//! `aloft`: the orchestrator server and the operator CLI. Parses arguments, sets up logging and
//! hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match aloft_orchestrator::cli::run(aloft_orchestrator::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the causes, for an operator; no backtrace, even with RUST_BACKTRACE.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
