//! `loadtest`: drives a keyserver with realistic scenarios and reports how fast and how correct
//! it was: throughput and latency percentiles per RPC (HDR histograms), failures by status code,
//! and the one-time prekeys it was handed (none may come twice; every bundle's signature is
//! checked on the client).
//!
//! ```sh
//! loadtest --scenario register --devices 10000      # the seed
//! loadtest --scenario fetch --devices 10000 --concurrency 16 --duration 30s --json fetch.json \
//!     --svg fetch.svg
//! loadtest --scenario fetch --devices 10000 --duration 60s \
//!     --during 'keyserver jobs refresh-bundles' --during-after 20s
//! # Through a failover: two servers, UNAVAILABLE expected, every key and upload in a ledger.
//! loadtest --scenario mixed --url http://127.0.0.1:50061,http://127.0.0.1:50062 \
//!     --tolerate UNAVAILABLE --ledger ledger.csv --json failover.json
//! ```

mod chart;
mod during;
mod population;
mod scenario;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use keyserver::config::{DataDirArgs, SecretArgs};
use keyserver::secret;

use scenario::{Plan, Scenario};
use stats::Recorder;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for the keyserver",
    args_override_self = true
)]
struct Cli {
    /// The server to drive: http://host:port, or https://host:port for TLS. Several, comma
    /// separated or repeated, spread the workers over them; a worker moves to the next one
    /// when a call answers UNAVAILABLE.
    #[arg(
        long,
        env = "KEYSERVER_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    url: Vec<String>,
    /// PEM CA certificate(s) to trust for an https:// server instead of the system's roots.
    #[arg(long, env = "KEYSERVER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mTLS).
    #[arg(long, env = "KEYSERVER_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(long, env = "KEYSERVER_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Allow a server that is not on this machine (refused by default: a load run is an attack
    /// on whatever it points at).
    #[arg(long)]
    allow_remote: bool,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Devices the run works on (registered by `--scenario register`, used by the others).
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Concurrent workers, each with its own connection.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Longest the run may take.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Most calls the run may make (register: at most one per device anyway).
    #[arg(long)]
    requests: Option<u64>,
    /// Devices without Kyber keys, as the nchat design's X3DH clients register (the default
    /// is PQXDH devices, as current Signal clients are). Give it to the seed and the runs alike.
    #[arg(long)]
    x3dh: bool,
    /// One-time Kyber prekeys each PQXDH device is seeded with.
    #[arg(long, default_value_t = population::KYBER_PREKEYS, value_parser = clap::value_parser!(u32).range(0..=100))]
    kyber_prekeys: u32,
    /// Write the full results (percentiles, failures, correctness, per-second timeline) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Calls failing with this status code (say UNAVAILABLE, through a failover) do not fail
    /// the run; they are still counted. Repeat for several codes.
    #[arg(long, value_name = "CODE")]
    tolerate: Vec<String>,
    /// Keep every one-time prekey upload and write a CSV ledger here (`served|uploaded,
    /// ec|kyber,device id,key id`) of every key handed out and every upload acknowledged, to
    /// check against the database after the run. Also counts keys served that were never
    /// uploaded, which assumes the devices hold only a fresh seed and this run's uploads.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Draw throughput and latency over time into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// A shell command to run while the load goes on (say `keyserver jobs refresh-bundles`);
    /// calls that complete while it runs are reported apart from the rest of the run.
    #[arg(long)]
    during: Option<String>,
    /// When to start the `--during` command, from the start of the run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    during_after: Duration,
    #[command(flatten)]
    data: DataDirArgs,
    #[command(flatten)]
    secret: SecretArgs,
}

/// Refuses URLs that leave this machine unless asked.
fn check_loopback(url: &str, allow_remote: bool) -> anyhow::Result<()> {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    let host = if url.contains("://[") {
        url.split('[')
            .nth(1)
            .and_then(|h| h.split(']').next())
            .unwrap_or("")
    } else {
        host
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        loopback || allow_remote,
        "{url} is not on this machine; pass --allow-remote to load it anyway"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    for url in &cli.url {
        check_loopback(url, cli.allow_remote)?;
    }
    anyhow::ensure!(cli.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(cli.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(
        cli.during.is_none() || cli.during_after < cli.duration,
        "--during-after must be shorter than --duration"
    );
    let tokens = secret::authority(&cli.secret, &cli.data, secret::Missing::Refuse)
        .context("the server's token secret (KEYSERVER_TOKEN_SECRET or its data directory)")?;
    let plan = Plan {
        scenario: cli.scenario,
        devices: cli.devices,
        concurrency: cli.concurrency,
        duration: cli.duration,
        max_calls: cli.requests,
        x3dh: cli.x3dh,
        kyber_prekeys: cli.kyber_prekeys,
    };
    let recorder = Arc::new(Recorder::new(!cli.x3dh, cli.ledger.is_some()));
    let during = cli
        .during
        .clone()
        .map(|command| during::spawn(command, cli.during_after, recorder.clone()));
    let bar = indicatif::ProgressBar::new_spinner();
    let progress = {
        let (recorder, bar) = (recorder.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (calls, failures) = recorder.progress();
                let secs = recorder.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "{secs:>6.1} s  {calls} calls  {:.0}/s  {failures} failed",
                    calls as f64 / secs
                ));
            }
        })
    };
    let servers = cli
        .url
        .iter()
        .map(|url| {
            keyserver_client::api::Address::new(
                url,
                cli.ca_cert.as_deref(),
                cli.client_cert.as_deref(),
                cli.client_key.as_deref(),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    scenario::run(&servers, tokens, &plan, recorder.clone()).await?;
    progress.abort();
    bar.finish_and_clear();
    let wall = recorder.elapsed();
    let during = match during {
        Some(task) if !task.is_finished() => {
            task.abort();
            anyhow::bail!(
                "the --during command had not finished when the load stopped at {:.1} s; \
                 give a longer --duration",
                wall.as_secs_f64()
            );
        }
        Some(task) => Some(task.await??),
        None => None,
    };

    let mut summary = recorder.summary(wall);
    if let Some(finished) = &during {
        finished.report(&recorder, wall, &mut summary);
    }
    summary["scenario"] = serde_json::json!(format!("{:?}", cli.scenario).to_lowercase());
    summary["devices"] = cli.devices.into();
    summary["concurrency"] = cli.concurrency.into();
    summary["url"] = cli.url.join(",").into();
    println!("{}", stats::render(&summary));
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &cli.ledger {
        write_ledger(path, &recorder)?;
    }
    if let Some(path) = &cli.svg {
        let title = format!(
            "{} · {} devices · concurrency {}",
            summary["scenario"].as_str().unwrap_or(""),
            cli.devices,
            cli.concurrency
        );
        chart::write_svg(path, &summary, &title)?;
    }
    if let Some(finished) = &during {
        let (succeeded, output) = finished.outcome();
        print!("{output}");
        anyhow::ensure!(succeeded, "the --during command failed");
    }
    let problems = recorder.problems(&cli.tolerate);
    anyhow::ensure!(
        problems.served_twice == 0,
        "{} one-time prekeys were served twice",
        problems.served_twice
    );
    anyhow::ensure!(
        problems.bad_signatures == 0,
        "{} bundles failed signature verification",
        problems.bad_signatures
    );
    anyhow::ensure!(
        problems.without_kyber == 0,
        "{} bundles came without a Kyber prekey from PQXDH devices (an X3DH seed needs --x3dh)",
        problems.without_kyber
    );
    anyhow::ensure!(
        problems.never_uploaded == 0,
        "{} one-time prekeys were served that were neither seeded nor uploaded",
        problems.never_uploaded
    );
    anyhow::ensure!(
        problems.failed_calls == 0,
        "{} calls failed",
        problems.failed_calls
    );
    Ok(())
}

/// Writes the `--ledger` CSV: one line per key handed out and per key whose upload was
/// acknowledged.
fn write_ledger(path: &std::path::Path, recorder: &Recorder) -> anyhow::Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for entry in recorder.ledger() {
        let (event, kind, device, id) = match entry {
            stats::Entry::Served(kind, device, id) => ("served", kind, device, id),
            stats::Entry::Uploaded(kind, device, id) => ("uploaded", kind, device, id),
        };
        let device = population::device_id(device);
        writeln!(out, "{event},{},{device},{id}", kind.name())?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::check_loopback;

    #[test]
    fn only_loopback_targets_unless_allowed() {
        for url in [
            "http://127.0.0.1:50051",
            "http://localhost:1",
            "http://[::1]:50051",
        ] {
            assert!(check_loopback(url, false).is_ok(), "{url}");
        }
        for url in ["http://10.0.0.1:50051", "http://example.com:50051"] {
            assert!(check_loopback(url, false).is_err(), "{url}");
            assert!(check_loopback(url, true).is_ok(), "{url}");
        }
    }
}
