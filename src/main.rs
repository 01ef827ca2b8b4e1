use mimalloc::MiMalloc;

/// mimalloc: glibc malloc's arena locks showed up in profiles (PERFORMANCE.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Purges this thread's freed pages that have waited long enough, so an
/// idle worker does not keep a burst's peak memory (server::set_allocator_collect).
fn collect_freed_pages() {
    // SAFETY: mi_collect has no preconditions; it works on the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

fn main() -> std::process::ExitCode {
    manifold::server::set_allocator_collect(collect_freed_pages);
    manifold::cli::main()
}
