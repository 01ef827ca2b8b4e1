use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc: glibc malloc's arena locks showed up in profiles (PERFORMANCE.md).
///
/// Called directly rather than through the `mimalloc` crate, whose
/// allocator asks for every block with `mi_malloc_aligned`: with
/// mimalloc 3 that took the slow generic path for about one allocation in
/// three of a proxied request (callgrind). Blocks whose alignment mimalloc
/// gives anyway (at most 16, and not above their size, as std's own
/// allocator reasons) use the plain calls.
struct Mimalloc;

/// What every mimalloc block is aligned to (MI_MAX_ALIGN_SIZE on 64-bit).
const MIN_ALIGN: usize = 16;

fn plain(layout: &Layout) -> bool {
    layout.align() <= MIN_ALIGN && layout.align() <= layout.size()
}

// SAFETY: each call hands mimalloc a size and alignment from a valid Layout
// and frees or grows only blocks mimalloc returned; mimalloc's functions are
// thread-safe.
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            unsafe { mi::mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(&layout) {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN && layout.align() <= new_size {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe { mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8 }
        }
    }
}

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// Purges this thread's freed pages that have waited long enough, so an
/// idle worker does not keep a burst's peak memory (server::set_allocator_collect).
fn collect_freed_pages() {
    // SAFETY: mi_collect has no preconditions; it works on the calling thread's heap.
    unsafe { mi::mi_collect(false) }
}

fn main() -> std::process::ExitCode {
    manifold::server::set_allocator_collect(collect_freed_pages);
    manifold::cli::main()
}
