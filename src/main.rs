//! The `vgrid` binary: every role in one executable. All logic lives in the crates under
//! `crates/`; this file only hands the command line to `vgrid-cli`.
fn main() -> std::process::ExitCode {
    vgrid_cli::main()
}
