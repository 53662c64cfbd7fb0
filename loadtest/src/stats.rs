//! What a run measured: a latency histogram per RPC (HDR, microseconds), failures by status
//! code, a per-second timeline, and the correctness ledger of one-time prekeys handed out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Latencies up to a minute, to 3 significant digits (2 for the per-second ones, which only
/// feed the chart).
fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, digits).expect("valid histogram bounds")
}

/// One second of the run.
struct Second {
    calls: u64,
    failures: u64,
    latency: Histogram<u64>,
}

#[derive(Default)]
struct Inner {
    latency: BTreeMap<&'static str, Histogram<u64>>,
    failures: BTreeMap<(&'static str, String), u64>,
    /// Per second since the start.
    timeline: Vec<Second>,
    /// (device, one-time prekey id) handed out during the run.
    served: HashSet<(u32, u32)>,
    served_twice: u64,
    /// One-time prekeys taken from each device during the run.
    taken: HashMap<u32, u32>,
    bundles: u64,
    without_key: u64,
    without_key_while_left: u64,
    bad_signatures: u64,
}

/// Shared by every worker of a run.
pub struct Recorder {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records one call of `rpc` that took `took`, failed with `failure` (a status code name).
    pub fn call(&self, rpc: &'static str, took: Duration, failure: Option<String>) {
        let micros = (took.as_micros() as u64).clamp(1, 60_000_000);
        let second = self.started.elapsed().as_secs() as usize;
        let mut inner = self.inner.lock().expect("recorder lock");
        while inner.timeline.len() <= second {
            inner.timeline.push(Second {
                calls: 0,
                failures: 0,
                latency: histogram(2),
            });
        }
        let slot = &mut inner.timeline[second];
        slot.calls += 1;
        slot.latency.record(micros).expect("latency within bounds");
        match failure {
            Some(code) => {
                slot.failures += 1;
                *inner.failures.entry((rpc, code)).or_default() += 1;
            }
            None => inner
                .latency
                .entry(rpc)
                .or_insert_with(|| histogram(3))
                .record(micros)
                .expect("latency within bounds"),
        }
    }

    /// Records a fetched bundle of `device`: the one-time prekey it carried, and whether its
    /// signature verified. `seeded` is how many keys the device had when the run started.
    pub fn bundle(&self, device: u32, one_time_key: Option<u32>, verified: bool, seeded: u32) {
        let mut inner = self.inner.lock().expect("recorder lock");
        inner.bundles += 1;
        if !verified {
            inner.bad_signatures += 1;
        }
        match one_time_key {
            Some(id) => {
                if !inner.served.insert((device, id)) {
                    inner.served_twice += 1;
                }
                *inner.taken.entry(device).or_default() += 1;
            }
            None => {
                inner.without_key += 1;
                if inner.taken.get(&device).copied().unwrap_or(0) < seeded {
                    inner.without_key_while_left += 1;
                }
            }
        }
    }

    /// Total failed calls and prekeys served twice: what makes a run fail.
    pub fn problems(&self) -> (u64, u64, u64) {
        let inner = self.inner.lock().expect("recorder lock");
        (
            inner.failures.values().sum(),
            inner.served_twice,
            inner.bad_signatures,
        )
    }

    /// Calls completed so far and failures, for the progress line.
    pub fn progress(&self) -> (u64, u64) {
        let inner = self.inner.lock().expect("recorder lock");
        inner
            .timeline
            .iter()
            .fold((0, 0), |(n, f), s| (n + s.calls, f + s.failures))
    }

    /// The run as JSON: per-RPC counts and percentiles (ms), failures, correctness, timeline.
    pub fn summary(&self, wall: Duration) -> Value {
        let inner = self.inner.lock().expect("recorder lock");
        let ms = |micros: u64| micros as f64 / 1000.0;
        let mut rpcs = serde_json::Map::new();
        for (rpc, h) in &inner.latency {
            rpcs.insert(
                (*rpc).to_owned(),
                json!({
                    "ok": h.len(),
                    "per_second": h.len() as f64 / wall.as_secs_f64(),
                    "p50_ms": ms(h.value_at_quantile(0.50)),
                    "p95_ms": ms(h.value_at_quantile(0.95)),
                    "p99_ms": ms(h.value_at_quantile(0.99)),
                    "p999_ms": ms(h.value_at_quantile(0.999)),
                    "max_ms": ms(h.max()),
                    "mean_ms": h.mean() / 1000.0,
                }),
            );
        }
        let failures: Vec<Value> = inner
            .failures
            .iter()
            .map(|((rpc, code), n)| json!({ "rpc": rpc, "code": code, "count": n }))
            .collect();
        json!({
            "seconds": wall.as_secs_f64(),
            "rpcs": rpcs,
            "failures": failures,
            "correctness": {
                "bundles": inner.bundles,
                "one_time_prekeys_served": inner.served.len() as u64 + inner.served_twice,
                "served_twice": inner.served_twice,
                "bundles_without_one_time_prekey": inner.without_key,
                "without_one_time_prekey_while_keys_were_left": inner.without_key_while_left,
                "bad_signatures": inner.bad_signatures,
            },
            "timeline": inner.timeline.iter().enumerate().map(|(s, second)| {
                json!({
                    "second": s,
                    "calls": second.calls,
                    "failures": second.failures,
                    "p50_ms": ms(second.latency.value_at_quantile(0.5)),
                    "p99_ms": ms(second.latency.value_at_quantile(0.99)),
                    "max_ms": ms(second.latency.max()),
                })
            }).collect::<Vec<_>>(),
        })
    }
}

/// The human summary of [`Recorder::summary`].
pub fn render(summary: &Value) -> String {
    let mut out = String::new();
    let seconds = summary["seconds"].as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "{:<22} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "rpc", "ok", "per s", "p50 ms", "p95 ms", "p99 ms", "p99.9", "max ms"
    ));
    if let Some(rpcs) = summary["rpcs"].as_object() {
        for (rpc, r) in rpcs {
            out.push_str(&format!(
                "{:<22} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
                rpc,
                r["ok"],
                r["per_second"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p95_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
                r["p999_ms"].as_f64().unwrap_or(0.0),
                r["max_ms"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    for f in summary["failures"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "failed {} {}: {}\n",
            f["rpc"].as_str().unwrap_or(""),
            f["code"].as_str().unwrap_or(""),
            f["count"]
        ));
    }
    let c = &summary["correctness"];
    out.push_str(&format!(
        "bundles {}, one-time prekeys served {}, served twice {}, without one {} \
         (while keys were left {}), bad signatures {}\n",
        c["bundles"],
        c["one_time_prekeys_served"],
        c["served_twice"],
        c["bundles_without_one_time_prekey"],
        c["without_one_time_prekey_while_keys_were_left"],
        c["bad_signatures"],
    ));
    out.push_str(&format!("{seconds:.1} s"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_served_twice_and_an_empty_bundle_with_keys_left_are_counted() {
        let r = Recorder::new();
        r.bundle(1, Some(5), true, 2);
        r.bundle(1, Some(5), true, 2);
        r.bundle(2, None, true, 2);
        r.bundle(3, Some(1), false, 2);
        let c = &r.summary(Duration::from_secs(1))["correctness"];
        assert_eq!(c["served_twice"], 1);
        assert_eq!(c["one_time_prekeys_served"], 3);
        assert_eq!(c["without_one_time_prekey_while_keys_were_left"], 1);
        assert_eq!(c["bad_signatures"], 1);
        assert_eq!(r.problems(), (0, 1, 1));
    }

    #[test]
    fn latencies_and_failures_are_kept_per_rpc() {
        let r = Recorder::new();
        for ms in 1..=100 {
            r.call("Fetch", Duration::from_millis(ms), None);
        }
        r.call("Fetch", Duration::from_millis(3), Some("NotFound".into()));
        let s = r.summary(Duration::from_secs(10));
        assert_eq!(s["rpcs"]["Fetch"]["ok"], 100);
        let p99 = s["rpcs"]["Fetch"]["p99_ms"].as_f64().unwrap();
        assert!((98.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(s["failures"][0]["code"], "NotFound");
        assert_eq!(r.progress(), (101, 1));
    }
}
