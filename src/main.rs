//! The `zmlx` binary: everything lives in the library (`zmlx::cli`).
fn main() {
    std::process::exit(zmlx::cli::main());
}
