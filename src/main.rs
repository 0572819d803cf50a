//! The `tidemark` command: dispatches subcommands to the library crates.

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = tidemark::cli::Cli::parse();
    tidemark::cli::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(tidemark::cli::dispatch(cli))
}
