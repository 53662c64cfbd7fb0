//! A command run alongside the load (`--during`), such as `keyserver jobs refresh-bundles`:
//! calls that complete while it runs are reported apart from the others of the same run, which
//! is how an operation's cost to fetch latency is measured side by side on a noisy machine.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::stats::{Phase, Recorder};

/// What the command did, once it has finished.
pub struct Finished {
    command: String,
    started: Duration,
    took: Duration,
    succeeded: bool,
    exit: String,
    output: String,
}

/// Starts `command` (through `sh -c`) `after` the run's start, in the background.
pub fn spawn(
    command: String,
    after: Duration,
    recorder: Arc<Recorder>,
) -> tokio::task::JoinHandle<anyhow::Result<Finished>> {
    recorder.enter(Phase::Outside);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        recorder.enter(Phase::During);
        let started = recorder.elapsed();
        let output = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await;
        recorder.enter(Phase::Outside);
        let took = recorder.elapsed() - started;
        let output = output.map_err(|e| anyhow::anyhow!("running `{command}`: {e}"))?;
        Ok(Finished {
            succeeded: output.status.success(),
            exit: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
            command,
            started,
            took,
        })
    })
}

impl Finished {
    /// Adds `during` and `outside` to the run's summary: the command and the calls that
    /// completed while it ran, then the calls of the rest of the run (`wall` long in all).
    pub fn report(&self, recorder: &Recorder, wall: Duration, summary: &mut Value) {
        summary["during"] = json!({
            "command": self.command,
            "started_s": self.started.as_secs_f64(),
            "seconds": self.took.as_secs_f64(),
            "exit": self.exit,
            "rpcs": recorder.phase_summary(Phase::During, self.took),
        });
        summary["outside"] = json!({
            "rpcs": recorder.phase_summary(Phase::Outside, wall.saturating_sub(self.took)),
        });
    }

    /// Whether the command succeeded, and what it printed.
    pub fn outcome(&self) -> (bool, &str) {
        (self.succeeded, &self.output)
    }
}
