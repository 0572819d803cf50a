//! The `tidemark` command: dispatches subcommands to the library crates.

fn main() {}
