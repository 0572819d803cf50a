//! The `tidemark` command: dispatches subcommands to the library crates.

use clap::Parser as _;

// jemalloc: its statistics tell live allocations from resident pages (what
// `bench soak` reports, to tell state from fragmentation), and it hands
// freed pages back to the system after a few seconds, where glibc's
// per-thread arenas may keep them for good.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    #[cfg(feature = "kafka")]
    tidemark::config_file::apply(&std::env::args_os().collect::<Vec<_>>())?;
    let cli = tidemark::cli::Cli::parse();
    tidemark_model::crash::check_env().map_err(anyhow::Error::msg)?;
    tidemark::cli::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(tidemark::cli::dispatch(cli))
}
