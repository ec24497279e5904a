//! The `tensorbus` binary: everything is in the library (`tensorbus_cli`).

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(tensorbus_cli::main(std::env::args_os().collect()) as u8)
}
