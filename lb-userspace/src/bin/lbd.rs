//! lbd: loads the XDP balancer, attaches it, and reports its counters.

use anyhow::{Context, Result};
use clap::Parser;
use lb_userspace::{
    dataplane::{self, AttachMode},
    stats,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(version, about = "XDP L4 load balancer daemon")]
struct Args {
    /// Interface to attach the XDP program to.
    #[arg(long, short = 'i')]
    interface: String,
    /// XDP attach mode: native (driver), generic (skb) or auto (native, else generic).
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mut ebpf = dataplane::load_balancer()?;
    let attached = dataplane::attach(&mut ebpf, &args.interface, args.xdp_mode)?;
    // A line on stdout that supervisors and tests can wait for.
    println!(
        "{}",
        serde_json::json!({"event": "attached", "interface": attached.interface, "mode": attached.mode.to_string()})
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => print_counters(&ebpf, "counters")?,
        }
    }
    attached.detach(&mut ebpf)?;
    print_counters(&ebpf, "final_counters")
}

fn print_counters(ebpf: &aya::Ebpf, event: &str) -> Result<()> {
    let counters = stats::global_counters(ebpf)?;
    println!(
        "{}",
        serde_json::json!({"event": event, "counters": counters})
    );
    Ok(())
}
