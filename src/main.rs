//! The `vgrid` binary: every role in one executable. All logic lives in the crates under
//! `crates/`; this file only hands the command line to `vgrid-cli`.

/// mimalloc, not glibc's malloc: with glibc, memory one thread frees that another allocated
/// takes the allocating arena's lock, and the scheduler's placing threads blocked each other
/// thousands of times a second on it (`bench/run scheduler`, `blocked_2t`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vgrid_cli::main()
}
