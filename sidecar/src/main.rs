//! Thin binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    sidecar::cli::main()
}
