//! Where the process's logs go, and the promise that writing them never takes the server down.
//!
//! Logs go to stderr, as text for people or JSON lines for log shippers (`--log-format`).
//! When whoever reads stderr goes away (a closed pipe, a restarted journald) a write fails with
//! EPIPE; tracing-subscriber would then report that with `eprintln!`, which panics on the same
//! broken stderr, inside whatever task was logging: the signal handler (so SIGTERM was never
//! acted on) or a handler after its write had committed (so the client saw CANCELLED for a
//! stored change). Here a failed log write is dropped instead, and counted, so the process
//! goes on serving and still shuts down cleanly.
//!
//! A reader that stays but stops reading (a stalled pipe) would block every thread that logs
//! once the pipe's buffer is full, the server with them. So lines are handed to a writer thread
//! through a bounded queue, and dropped when the queue is full rather than waited for.

use std::io::{self, Write};

use clap::ValueEnum;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the request's span fields.
    Json,
}

/// The filter used when `KEYSERVER_LOG` is unset.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 16_384;

/// Installs the process's logger. `KEYSERVER_LOG` takes an `EnvFilter` directive (for example
/// `debug` to see every request). Keep the guard until the process ends: dropping it writes
/// out what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_env("KEYSERVER_LOG").unwrap_or_else(|_| DEFAULT_FILTER.into());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("keyserver-log")
        .finish(Stderr);
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    guard
}

/// stderr, where a write that fails is dropped rather than reported.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if io::stderr().write_all(buf).is_err() {
            metrics::counter!(crate::edge::metrics::LOG_LINES_DROPPED).increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}
