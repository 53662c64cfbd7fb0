//! What a run measured: a latency histogram per RPC (HDR, microseconds), failures by status
//! code, a per-second timeline, the outages workers saw (first UNAVAILABLE to the next success),
//! and the correctness ledgers of one-time prekeys handed out (EC and Kyber) and, when asked,
//! of every upload sent and acknowledged, so a run through a failover can be checked against
//! the database afterwards. When a command runs alongside the load (`--during`), latencies are
//! also kept apart by whether the call completed while it ran, so its effect is measured within
//! one run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
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

/// Whether a call completed while the `--during` command ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Outside = 1,
    During = 2,
}

/// The one-time keys of one kind handed out during a run.
#[derive(Default)]
struct Ledger {
    /// (device, key id) handed out.
    served: HashSet<(u32, u32)>,
    served_twice: u64,
    /// Keys taken from each device.
    taken: HashMap<u32, u32>,
    /// Bundles that came without a one-time key of this kind.
    without: u64,
    /// Per device: bundles that came without one, and the keys it was seeded with.
    empty: HashMap<u32, (u64, u32)>,
}

impl Ledger {
    fn record(&mut self, device: u32, key: Option<u32>, seeded: u32) {
        match key {
            Some(id) => {
                if !self.served.insert((device, id)) {
                    self.served_twice += 1;
                }
                *self.taken.entry(device).or_default() += 1;
            }
            None => {
                self.without += 1;
                self.empty.entry(device).or_insert((0, seeded)).0 += 1;
            }
        }
    }

    fn served(&self) -> u64 {
        self.served.len() as u64 + self.served_twice
    }

    /// Bundles without a one-time key from devices that still had keys when the run ended.
    /// Judged at the end, not when the bundle came: a fetch that races another for a device's
    /// last key comes back empty while the other takes it (the row is locked, so it is
    /// skipped), and that is the key served once, not a key withheld.
    fn without_while_left(&self) -> u64 {
        self.empty
            .iter()
            .filter(|(device, (_, seeded))| self.taken.get(device).copied().unwrap_or(0) < *seeded)
            .map(|(_, (empty, _))| empty)
            .sum()
    }
}

/// The two kinds of one-time prekey, whose ids are apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    Ec,
    Kyber,
}

impl KeyKind {
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Ec => "ec",
            KeyKind::Kyber => "kyber",
        }
    }
}

/// Every one-time prekey upload of a run, kept with `--ledger`: the run's devices hold only
/// their seed and these, so a served key that is in neither was never uploaded.
#[derive(Default)]
struct Uploads {
    /// (kind, device, key id) sent, whether or not the answer came.
    sent: HashSet<(KeyKind, u32, u32)>,
    /// (kind, device, key id) the server acknowledged.
    acknowledged: Vec<(KeyKind, u32, u32)>,
    /// Served keys neither seeded nor ever sent.
    served_never_uploaded: u64,
}

/// One row of the ledger a run writes with `--ledger`.
pub enum Entry {
    /// A one-time prekey handed out to the run.
    Served(KeyKind, u32, u32),
    /// A one-time prekey upload the server acknowledged.
    Uploaded(KeyKind, u32, u32),
}

/// The Kyber prekey a bundle carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KyberKey {
    /// None: the device has no Kyber keys (an X3DH bundle).
    Missing,
    OneTime(u32),
    LastResort,
}

#[derive(Default)]
struct Inner {
    latency: BTreeMap<&'static str, Histogram<u64>>,
    /// Successful calls by phase, kept only once [`Recorder::enter`] has been called.
    phases: BTreeMap<(Phase, &'static str), Histogram<u64>>,
    failures: BTreeMap<(&'static str, String), u64>,
    /// Per second since the start.
    timeline: Vec<Second>,
    bundles: u64,
    one_time: Ledger,
    kyber: Ledger,
    /// Bundles without any Kyber prekey.
    without_kyber: u64,
    bad_signatures: u64,
    /// Kept only with `--ledger`.
    uploads: Option<Uploads>,
    /// (start since the run began, length) of each stretch a worker saw only UNAVAILABLE.
    outages: Vec<(Duration, Duration)>,
}

impl Inner {
    /// Counts `id` of `device` as never uploaded if it is neither seeded (1..=seeded) nor sent.
    fn check_uploaded(&mut self, kind: KeyKind, device: u32, id: u32, seeded: u32) {
        if let Some(uploads) = &mut self.uploads
            && !(1..=seeded).contains(&id)
            && !uploads.sent.contains(&(kind, device, id))
        {
            uploads.served_never_uploaded += 1;
        }
    }
}

/// What makes a run fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problems {
    pub failed_calls: u64,
    /// One-time prekeys (EC or Kyber) handed out twice.
    pub served_twice: u64,
    pub bad_signatures: u64,
    /// Bundles without a Kyber prekey where every seeded device has one.
    pub without_kyber: u64,
    /// One-time prekeys served that were neither seeded nor uploaded (with `--ledger`).
    pub never_uploaded: u64,
}

/// Shared by every worker of a run.
pub struct Recorder {
    started: Instant,
    /// The same moment on the wall clock, for lining a run up with events outside it.
    started_at: std::time::SystemTime,
    /// 0 while calls are not split by phase, else the current [`Phase`].
    phase: AtomicU8,
    /// Whether every device has Kyber keys (PQXDH), so every bundle must carry one.
    pqxdh: bool,
    inner: Mutex<Inner>,
}

impl Recorder {
    /// A recorder for a run of PQXDH devices (or not); `ledger` keeps every upload as well.
    pub fn new(pqxdh: bool, ledger: bool) -> Self {
        Self {
            started: Instant::now(),
            started_at: std::time::SystemTime::now(),
            phase: AtomicU8::new(0),
            pqxdh,
            inner: Mutex::new(Inner {
                uploads: ledger.then(Uploads::default),
                ..Inner::default()
            }),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// From now on, calls that complete are also counted under `phase`.
    pub fn enter(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    /// Records one call of `rpc` that took `took`, failed with `failure` (a status code name).
    pub fn call(&self, rpc: &'static str, took: Duration, failure: Option<String>) {
        let micros = (took.as_micros() as u64).clamp(1, 60_000_000);
        let second = self.started.elapsed().as_secs() as usize;
        let phase = match self.phase.load(Ordering::SeqCst) {
            1 => Some(Phase::Outside),
            2 => Some(Phase::During),
            _ => None,
        };
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
            None => {
                let overall = inner.latency.entry(rpc).or_insert_with(|| histogram(3));
                overall.record(micros).expect("latency within bounds");
                if let Some(phase) = phase {
                    let split = inner.phases.entry((phase, rpc));
                    let split = split.or_insert_with(|| histogram(3));
                    split.record(micros).expect("latency within bounds");
                }
            }
        }
    }

    /// Records a fetched bundle of `device`: the one-time prekey and the Kyber prekey it
    /// carried, and whether its signatures verified. `seeded` is how many one-time keys of each
    /// kind (EC, Kyber) the device had when the run started.
    pub fn bundle(
        &self,
        device: u32,
        one_time_key: Option<u32>,
        kyber: KyberKey,
        verified: bool,
        seeded: (u32, u32),
    ) {
        let mut inner = self.inner.lock().expect("recorder lock");
        inner.bundles += 1;
        if !verified {
            inner.bad_signatures += 1;
        }
        inner.one_time.record(device, one_time_key, seeded.0);
        if let Some(id) = one_time_key {
            inner.check_uploaded(KeyKind::Ec, device, id, seeded.0);
        }
        match kyber {
            KyberKey::Missing => inner.without_kyber += 1,
            KyberKey::OneTime(id) => {
                inner.kyber.record(device, Some(id), seeded.1);
                inner.check_uploaded(KeyKind::Kyber, device, id, seeded.1);
            }
            KyberKey::LastResort => inner.kyber.record(device, None, seeded.1),
        }
    }

    /// An upload of one-time prekeys `ids` of `device` is about to be sent (before it is, so
    /// a key it stores is never served before it is known).
    pub fn uploading(&self, kind: KeyKind, device: u32, ids: Range<u32>) {
        let mut inner = self.inner.lock().expect("recorder lock");
        if let Some(uploads) = &mut inner.uploads {
            uploads.sent.extend(ids.map(|id| (kind, device, id)));
        }
    }

    /// The server acknowledged the upload of one-time prekeys `ids` of `device`.
    pub fn uploaded(&self, kind: KeyKind, device: u32, ids: Range<u32>) {
        let mut inner = self.inner.lock().expect("recorder lock");
        if let Some(uploads) = &mut inner.uploads {
            uploads
                .acknowledged
                .extend(ids.map(|id| (kind, device, id)));
        }
    }

    /// A worker saw only UNAVAILABLE from `since` (since the run began) for `took`, until a
    /// call succeeded.
    pub fn outage(&self, since: Duration, took: Duration) {
        let mut inner = self.inner.lock().expect("recorder lock");
        inner.outages.push((since, took));
    }

    /// What makes the run fail; failed calls with a status code in `tolerated` (as in
    /// `UNAVAILABLE` or `Unavailable`) do not count.
    pub fn problems(&self, tolerated: &[String]) -> Problems {
        let inner = self.inner.lock().expect("recorder lock");
        let tolerated = |code: &str| {
            tolerated
                .iter()
                .any(|t| t.replace('_', "").eq_ignore_ascii_case(code))
        };
        Problems {
            failed_calls: inner
                .failures
                .iter()
                .filter(|((_, code), _)| !tolerated(code))
                .map(|(_, n)| n)
                .sum(),
            served_twice: inner.one_time.served_twice + inner.kyber.served_twice,
            bad_signatures: inner.bad_signatures,
            without_kyber: if self.pqxdh { inner.without_kyber } else { 0 },
            never_uploaded: inner
                .uploads
                .as_ref()
                .map_or(0, |u| u.served_never_uploaded),
        }
    }

    /// Every key served and every upload acknowledged, for checking against the database.
    pub fn ledger(&self) -> Vec<Entry> {
        let inner = self.inner.lock().expect("recorder lock");
        let served = [
            (KeyKind::Ec, &inner.one_time),
            (KeyKind::Kyber, &inner.kyber),
        ]
        .into_iter()
        .flat_map(|(kind, ledger)| {
            ledger
                .served
                .iter()
                .map(move |&(device, id)| Entry::Served(kind, device, id))
        });
        let uploaded = inner.uploads.iter().flat_map(|u| {
            u.acknowledged
                .iter()
                .map(|&(kind, device, id)| Entry::Uploaded(kind, device, id))
        });
        served.chain(uploaded).collect()
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
        let rpcs = per_rpc(inner.latency.iter().map(|(rpc, h)| (*rpc, h)), wall);
        let failures: Vec<Value> = inner
            .failures
            .iter()
            .map(|((rpc, code), n)| json!({ "rpc": rpc, "code": code, "count": n }))
            .collect();
        let started_unix_s = self
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        json!({
            "seconds": wall.as_secs_f64(),
            "started_unix_s": started_unix_s,
            "rpcs": rpcs,
            "failures": failures,
            "correctness": {
                "bundles": inner.bundles,
                "one_time_prekeys_served": inner.one_time.served(),
                "served_twice": inner.one_time.served_twice,
                "bundles_without_one_time_prekey": inner.one_time.without,
                "without_one_time_prekey_while_keys_were_left": inner.one_time.without_while_left(),
                "kyber_one_time_prekeys_served": inner.kyber.served(),
                "kyber_served_twice": inner.kyber.served_twice,
                "bundles_with_last_resort_kyber_prekey": inner.kyber.without,
                "last_resort_while_kyber_keys_were_left": inner.kyber.without_while_left(),
                "bundles_without_kyber_prekey": inner.without_kyber,
                "bad_signatures": inner.bad_signatures,
                "served_never_uploaded": inner.uploads.as_ref().map(|u| u.served_never_uploaded),
                "uploads_acknowledged": inner.uploads.as_ref().map(|u| u.acknowledged.len()),
            },
            "outages": {
                "count": inner.outages.len(),
                "longest_s": inner.outages.iter().map(|(_, took)| took.as_secs_f64())
                    .fold(0.0, f64::max),
                "each": inner.outages.iter().map(|(since, took)| json!({
                    "from_s": since.as_secs_f64(),
                    "seconds": took.as_secs_f64(),
                })).collect::<Vec<_>>(),
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

    /// Per-RPC counts and percentiles of the calls that completed in `phase`, which lasted
    /// `seconds` in all.
    pub fn phase_summary(&self, phase: Phase, seconds: Duration) -> Value {
        let inner = self.inner.lock().expect("recorder lock");
        let split = inner.phases.iter().filter(|((p, _), _)| *p == phase);
        per_rpc(split.map(|((_, rpc), h)| (*rpc, h)), seconds)
    }
}

/// Count, rate over `wall` and percentiles (ms) of each RPC's histogram.
fn per_rpc<'a>(
    histograms: impl Iterator<Item = (&'a str, &'a Histogram<u64>)>,
    wall: Duration,
) -> Value {
    let ms = |micros: u64| micros as f64 / 1000.0;
    let rpcs: serde_json::Map<String, Value> = histograms
        .map(|(rpc, h)| {
            let figures = json!({
                "ok": h.len(),
                "per_second": h.len() as f64 / wall.as_secs_f64(),
                "p50_ms": ms(h.value_at_quantile(0.50)),
                "p95_ms": ms(h.value_at_quantile(0.95)),
                "p99_ms": ms(h.value_at_quantile(0.99)),
                "p999_ms": ms(h.value_at_quantile(0.999)),
                "max_ms": ms(h.max()),
                "mean_ms": h.mean() / 1000.0,
            });
            (rpc.to_owned(), figures)
        })
        .collect();
    Value::Object(rpcs)
}

/// The human summary of [`Recorder::summary`].
pub fn render(summary: &Value) -> String {
    let mut out = String::new();
    let seconds = summary["seconds"].as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "{:<28} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "rpc", "ok", "per s", "p50 ms", "p95 ms", "p99 ms", "p99.9", "max ms"
    ));
    render_rpcs(&mut out, &summary["rpcs"], "");
    if let Some(during) = summary.get("during") {
        render_rpcs(&mut out, &during["rpcs"], " during");
        render_rpcs(&mut out, &summary["outside"]["rpcs"], " outside");
        out.push_str(&format!(
            "during: `{}` started at {:.1} s, took {:.2} s, {}\n",
            during["command"].as_str().unwrap_or(""),
            during["started_s"].as_f64().unwrap_or(0.0),
            during["seconds"].as_f64().unwrap_or(0.0),
            during["exit"].as_str().unwrap_or(""),
        ));
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
    out.push_str(&format!(
        "one-time Kyber prekeys served {}, served twice {}, last-resort Kyber prekeys served {} \
         (while one-time ones were left {}), bundles without a Kyber prekey {}\n",
        c["kyber_one_time_prekeys_served"],
        c["kyber_served_twice"],
        c["bundles_with_last_resort_kyber_prekey"],
        c["last_resort_while_kyber_keys_were_left"],
        c["bundles_without_kyber_prekey"],
    ));
    if let Some(never) = c["served_never_uploaded"].as_u64() {
        out.push_str(&format!(
            "uploads acknowledged {}, keys served that were never uploaded {never}\n",
            c["uploads_acknowledged"]
        ));
    }
    let outages = &summary["outages"];
    if outages["count"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!(
            "outages seen by workers {}, longest {:.2} s (first UNAVAILABLE to the next success)\n",
            outages["count"],
            outages["longest_s"].as_f64().unwrap_or(0.0)
        ));
    }
    out.push_str(&format!("{seconds:.1} s"));
    out
}

/// One line per RPC of a [`per_rpc`] object, its name followed by `label`.
fn render_rpcs(out: &mut String, rpcs: &Value, label: &str) {
    for (rpc, r) in rpcs.as_object().into_iter().flatten() {
        let f = |key: &str| r[key].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "{:<28} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
            format!("{rpc}{label}"),
            r["ok"],
            f("per_second"),
            f("p50_ms"),
            f("p95_ms"),
            f("p99_ms"),
            f("p999_ms"),
            f("max_ms"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_served_twice_and_an_empty_bundle_with_keys_left_are_counted() {
        let r = Recorder::new(true, false);
        let kyber = KyberKey::LastResort;
        r.bundle(1, Some(5), kyber, true, (2, 0));
        r.bundle(1, Some(5), kyber, true, (2, 0));
        r.bundle(2, None, kyber, true, (2, 0));
        r.bundle(3, Some(1), kyber, false, (2, 0));
        // Device 4's empty bundle is recorded before the fetch that took its last key: a race
        // for that key, not a key withheld.
        r.bundle(4, Some(1), kyber, true, (2, 0));
        r.bundle(4, None, kyber, true, (2, 0));
        r.bundle(4, Some(2), kyber, true, (2, 0));
        let c = &r.summary(Duration::from_secs(1))["correctness"];
        assert_eq!(c["served_twice"], 1);
        assert_eq!(c["one_time_prekeys_served"], 5);
        assert_eq!(c["bundles_without_one_time_prekey"], 2);
        assert_eq!(c["without_one_time_prekey_while_keys_were_left"], 1);
        assert_eq!(c["bad_signatures"], 1);
        let problems = r.problems(&[]);
        assert_eq!((problems.served_twice, problems.bad_signatures), (1, 1));
    }

    #[test]
    fn kyber_keys_are_kept_apart_and_a_missing_one_is_a_problem_only_under_pqxdh() {
        for pqxdh in [true, false] {
            let r = Recorder::new(pqxdh, false);
            // Device 1 was seeded 3 one-time Kyber keys and 2 were taken (one id twice).
            r.bundle(1, None, KyberKey::OneTime(3), true, (0, 3));
            r.bundle(1, None, KyberKey::OneTime(3), true, (0, 3));
            r.bundle(1, None, KyberKey::LastResort, true, (0, 3));
            r.bundle(2, None, KyberKey::Missing, true, (0, 3));
            let c = &r.summary(Duration::from_secs(1))["correctness"];
            assert_eq!(c["kyber_one_time_prekeys_served"], 2);
            assert_eq!(c["kyber_served_twice"], 1);
            assert_eq!(c["served_twice"], 0, "EC and Kyber ids are apart");
            assert_eq!(c["bundles_with_last_resort_kyber_prekey"], 1);
            assert_eq!(c["last_resort_while_kyber_keys_were_left"], 1);
            assert_eq!(c["bundles_without_kyber_prekey"], 1);
            let problems = r.problems(&[]);
            assert_eq!(problems.served_twice, 1);
            assert_eq!(problems.without_kyber, u64::from(pqxdh));
        }
    }

    #[test]
    fn with_a_ledger_a_served_key_neither_seeded_nor_sent_is_counted() {
        let r = Recorder::new(true, true);
        r.uploading(KeyKind::Ec, 1, 500..510);
        r.uploaded(KeyKind::Ec, 1, 500..510);
        r.uploading(KeyKind::Kyber, 1, 700..702);
        // Seeded (1..=100), sent and acknowledged, sent to another device, never sent.
        r.bundle(1, Some(100), KyberKey::OneTime(701), true, (100, 100));
        r.bundle(1, Some(505), KyberKey::OneTime(101), true, (100, 100));
        r.bundle(2, Some(505), KyberKey::LastResort, true, (100, 100));
        r.bundle(1, Some(510), KyberKey::OneTime(702), true, (100, 100));
        let problems = r.problems(&[]);
        assert_eq!(
            problems.never_uploaded, 4,
            "kyber 101, ec 505 of 2, ec 510, kyber 702"
        );
        let c = &r.summary(Duration::from_secs(1))["correctness"];
        assert_eq!(c["served_never_uploaded"], 4);
        assert_eq!(c["uploads_acknowledged"], 10);
        let ledger = r.ledger();
        let uploaded = ledger
            .iter()
            .filter(|e| matches!(e, Entry::Uploaded(KeyKind::Ec, 1, 500..510)))
            .count();
        let served = ledger
            .iter()
            .filter(|e| matches!(e, Entry::Served(..)))
            .count();
        assert_eq!((uploaded, served), (10, 7));

        let without = Recorder::new(true, false);
        without.bundle(1, Some(510), KyberKey::OneTime(702), true, (100, 100));
        assert_eq!(
            without.problems(&[]).never_uploaded,
            0,
            "nothing to judge by"
        );
        assert!(
            without.summary(Duration::from_secs(1))["correctness"]["served_never_uploaded"]
                .is_null()
        );
    }

    #[test]
    fn tolerated_codes_do_not_fail_a_run_and_outages_are_reported() {
        let r = Recorder::new(true, false);
        r.call(
            "Fetch",
            Duration::from_millis(1),
            Some("Unavailable".into()),
        );
        r.call(
            "Fetch",
            Duration::from_millis(1),
            Some("DeadlineExceeded".into()),
        );
        r.call("Fetch", Duration::from_millis(1), Some("Internal".into()));
        assert_eq!(r.problems(&[]).failed_calls, 3);
        let tolerated = ["UNAVAILABLE".to_owned(), "deadline_exceeded".to_owned()];
        assert_eq!(r.problems(&tolerated).failed_calls, 1);
        r.outage(Duration::from_secs(8), Duration::from_millis(9_500));
        r.outage(Duration::from_secs(20), Duration::from_millis(300));
        let outages = &r.summary(Duration::from_secs(30))["outages"];
        assert_eq!(outages["count"], 2);
        assert_eq!(outages["longest_s"], 9.5);
        assert_eq!(outages["each"][1]["from_s"], 20.0);
    }

    #[test]
    fn latencies_and_failures_are_kept_per_rpc() {
        let r = Recorder::new(true, false);
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

    #[test]
    fn calls_are_split_by_whether_they_completed_while_the_command_ran() {
        let r = Recorder::new(true, false);
        r.call("Fetch", Duration::from_millis(1), None);
        r.enter(Phase::Outside);
        r.call("Fetch", Duration::from_millis(2), None);
        r.enter(Phase::During);
        r.call("Fetch", Duration::from_millis(10), None);
        r.call("Fetch", Duration::from_millis(12), None);
        r.call(
            "Fetch",
            Duration::from_millis(5),
            Some("Unavailable".into()),
        );
        r.enter(Phase::Outside);
        r.call("Fetch", Duration::from_millis(3), None);

        let during = r.phase_summary(Phase::During, Duration::from_secs(2));
        assert_eq!(during["Fetch"]["ok"], 2);
        assert_eq!(during["Fetch"]["per_second"], 1.0);
        let max = during["Fetch"]["max_ms"].as_f64().unwrap();
        assert!((12.0..12.1).contains(&max), "{max}");
        let outside = r.phase_summary(Phase::Outside, Duration::from_secs(8));
        assert_eq!(
            outside["Fetch"]["ok"], 2,
            "calls before the split are in neither"
        );
        let max = outside["Fetch"]["max_ms"].as_f64().unwrap();
        assert!((3.0..3.01).contains(&max), "{max}");
        assert_eq!(r.summary(Duration::from_secs(10))["rpcs"]["Fetch"]["ok"], 5);
    }
}
