use mimalloc::MiMalloc;

/// mimalloc: glibc malloc's arena locks showed up in profiles (PERFORMANCE.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    manifold::cli::main()
}
