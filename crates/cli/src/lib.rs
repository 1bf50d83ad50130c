//! The `vgrid` command line: parses arguments and runs a role or a client command.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
