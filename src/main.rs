use clap::Parser;

fn main() -> std::process::ExitCode {
    sluice::cli::main(sluice::cli::Cli::parse())
}
