use clap::Parser;

#[tokio::main]
async fn main() {
    return_large_allocations_to_the_system();
    let cli = nidan::cli::Cli::parse();
    if let Err(e) = nidan::cli::run(cli).await {
        eprintln!("nidan: {e:#}");
        std::process::exit(1);
    }
}

/// glibc serves large allocations from its arenas once a big block has been freed, and keeps
/// them: argon2's 19 MiB of memory per check would then stay with every blocking thread. Blocks of
/// 1 MiB and more are always mapped and unmapped instead, so memory goes back after the load.
fn return_large_allocations_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings and is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
}
