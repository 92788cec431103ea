use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = nidan::cli::Cli::parse();
    if let Err(e) = nidan::cli::run(cli).await {
        eprintln!("nidan: {e:#}");
        std::process::exit(1);
    }
}
