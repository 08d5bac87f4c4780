//! `sluice bench`: a load generator for any OpenAI-compatible server.

/// `sluice bench ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Drive an OpenAI-compatible server with load and report latency and throughput.
    Serve,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Serve => anyhow::bail!("not yet"),
    }
}
