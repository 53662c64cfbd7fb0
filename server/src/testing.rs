//! Test harness shared by the server's and the client's integration tests: real databases of
//! both backends and a real server on a loopback port.
//!
//! PostgreSQL comes from `DATABASE_URL` when it is set; otherwise a throwaway cluster is
//! started from the installed PostgreSQL binaries (as the `postgres` user when running as root,
//! since initdb refuses root) and killed with the test process. SQLite databases are files in a
//! temporary directory. Each test gets a database of its own, removed when the test ends.

use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::auth::{TokenAuthority, TokenPolicy};
use crate::clock::Clock;
use crate::config::{
    CleanupSettings, DrainArgs, EdgeSettings, LimitArgs, RotationPolicy, Schedule,
};
use crate::edge::tls::TlsFiles;
use crate::jobs::Jobs;
use crate::limits::Limits;
use crate::server::{self, ServerParts};
use crate::shutdown::CancellationToken;
use crate::store::bundles::coalesce::DEFAULT_BATCHES_IN_FLIGHT;
use crate::store::database::Database;
use crate::store::migrations;
use crate::store::{DeviceId, Serve, Store};

/// The PostgreSQL server the tests of this process use: its admin URL.
fn admin_url() -> &'static str {
    static ADMIN: OnceLock<Result<String, String>> = OnceLock::new();
    match ADMIN.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => start_cluster(),
    }) {
        Ok(url) => url,
        Err(why) => panic!(
            "integration tests need PostgreSQL: set DATABASE_URL to a server where the user may \
             CREATE DATABASE, or install the PostgreSQL server binaries (initdb, postgres) so a \
             throwaway cluster can be started. Starting one failed: {why}"
        ),
    }
}

fn find_bindir() -> Result<PathBuf, String> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
        .ok_or_else(|| {
            "no initdb/postgres found (pg_config --bindir, /usr/lib/postgresql/*/bin)".into()
        })
}

/// The uid and gid to run PostgreSQL as: `postgres` when we are root, ourselves otherwise.
fn run_as() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("running as root and there is no `postgres` user to run initdb as".into());
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

/// Runs the command as `user` (if given) and has the kernel send it `death_signal` when the
/// thread that spawned it ends.
fn prepare(cmd: &mut Command, user: Option<(u32, u32)>, death_signal: Option<i32>) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(signal) = death_signal
                && libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn remove_stale_clusters(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("keyserver-test-pg-")
            .map(|rest| rest.split('-').next().unwrap_or(rest))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A PostgreSQL cluster made for this test process: its binaries, its directory and port.
struct Cluster {
    bindir: PathBuf,
    user: Option<(u32, u32)>,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    /// Runs initdb in a new directory named `name` under the temporary directory.
    fn init(name: &str) -> Result<Self, String> {
        let bindir = find_bindir()?;
        let user = run_as()?;
        let parent = std::env::temp_dir();
        remove_stale_clusters(&parent);
        let dir = parent.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .args(["-D"])
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-locale",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        prepare(&mut initdb, user, None);
        let out = initdb
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        Ok(Self {
            bindir,
            user,
            dir,
            port,
        })
    }

    /// The postmaster's command line; it dies (SIGQUIT, taking its backends with it) when the
    /// thread that spawns it ends.
    fn postgres(&self) -> Result<Command, String> {
        let mut postgres = Command::new(self.bindir.join("postgres"));
        postgres
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("postgres.log"))
                    .map_err(|e| e.to_string())?,
            );
        prepare(&mut postgres, self.user, Some(libc::SIGQUIT));
        Ok(postgres)
    }

    /// Waits until the cluster accepts connections.
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(format!(
                    "postgres did not accept connections within 30 s: {log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// The cluster every test of this process shares, alive as long as the process.
fn start_cluster() -> Result<String, String> {
    let cluster = Cluster::init(&format!("keyserver-test-pg-{}", std::process::id()))?;
    let mut postgres = cluster.postgres()?;
    // The death signal fires when the spawning thread ends, so spawn from a thread that lives
    // as long as the test process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let spawned = postgres.spawn();
            let failed = spawned.is_err();
            let _ = tx.send(spawned.map(|_| ()));
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("starting postgres: {e}"))?;
    cluster.wait_ready()?;
    Ok(cluster.url())
}

/// A PostgreSQL cluster of one test's own, which the test may stop and start again (to see
/// what the server does while its database is down). Removed when dropped.
pub struct PrivatePostgres {
    cluster: Cluster,
    running: Option<std::process::Child>,
}

impl PrivatePostgres {
    /// A new cluster, started. Panics with the reason when PostgreSQL cannot be started here.
    pub fn start() -> Self {
        let name = format!(
            "keyserver-test-pg-{}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        );
        let cluster = Cluster::init(&name)
            .unwrap_or_else(|why| panic!("this test needs the PostgreSQL server binaries: {why}"));
        let mut this = Self {
            cluster,
            running: None,
        };
        this.resume();
        this
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        self.cluster.url()
    }

    /// Stops the cluster (fast shutdown: connections are closed), as a crash or a maintenance
    /// window would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.running.take() {
            // SAFETY: kill has no memory preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Starts the cluster again on the same port.
    pub fn resume(&mut self) {
        if self.running.is_none() {
            let child = self
                .cluster
                .postgres()
                .and_then(|mut c| c.spawn().map_err(|e| e.to_string()))
                .unwrap_or_else(|why| panic!("starting postgres: {why}"));
            self.running = Some(child);
            self.cluster
                .wait_ready()
                .unwrap_or_else(|why| panic!("{why}"));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.cluster.dir);
    }
}

/// A Redis of one test's own, from the installed `redis-server`, on a free loopback port,
/// keeping nothing on disk; the test may kill it and start it again on the same port. Killed
/// when dropped. Tests that only need a shared Redis use [`shared_redis_url`].
pub struct PrivateRedis {
    port: u16,
    running: Option<std::process::Child>,
    die_with_thread: bool,
}

impl PrivateRedis {
    /// A new Redis, started. Panics with the reason when `redis-server` cannot run here.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    fn start_with(die_with_thread: bool) -> Self {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        let mut this = Self {
            port,
            running: None,
            die_with_thread,
        };
        this.resume();
        this
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills Redis outright, as a crash or a lost host would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.running.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Redis again on the same port (empty: it kept nothing).
    pub fn resume(&mut self) {
        if self.running.is_some() {
            return;
        }
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.die_with_thread {
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("this test needs redis-server (Debian package redis-server): {e}")
        });
        self.running = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready once it answers PING.
        while !redis_answers(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut reply = [0u8; 7];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The Redis for tests that share one: `REDIS_URL` when set, else a private one started for
/// this test binary. Keys are per user, and every test's users are new, so tests do not see
/// each other's buckets.
pub fn shared_redis_url() -> String {
    static PRIVATE: OnceLock<String> = OnceLock::new();
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => PRIVATE
            .get_or_init(|| {
                // A static is never dropped: the Redis is started by a thread that lives as
                // long as the test binary, and dies with that thread (PR_SET_PDEATHSIG).
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let redis = PrivateRedis::start_with(true);
                    let _ = tx.send(redis.url());
                    loop {
                        std::thread::park();
                    }
                });
                rx.recv().expect("starting the shared test Redis")
            })
            .clone(),
    }
}

fn with_database(url: &str, name: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("DATABASE_URL is a URL");
    parsed.set_path(&format!("/{name}"));
    parsed.to_string()
}

async fn admin() -> PgConnection {
    let url = admin_url();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return conn,
            // A fresh cluster may still be starting up.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("connecting to the test PostgreSQL: {e}"),
        }
    }
}

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database of one test's own, removed when this value is dropped.
pub struct TestDb {
    backend: Backend,
    url: String,
    /// The PostgreSQL database's name, or the SQLite file's directory.
    place: String,
}

impl TestDb {
    /// An empty database (no migrations applied).
    pub async fn empty(backend: Backend) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        match backend {
            Backend::Postgres => {
                let name = format!("keyserver_test_{id}");
                admin()
                    .await
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("CREATE DATABASE");
                let url = with_database(admin_url(), &name);
                Self {
                    backend,
                    url,
                    place: name,
                }
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("keyserver-test-sqlite-{id}"));
                std::fs::create_dir_all(&dir).expect("creating the SQLite test directory");
                let url = format!("sqlite://{}", dir.join("keyserver.db").display());
                Self {
                    backend,
                    url,
                    place: dir.display().to_string(),
                }
            }
        }
    }

    /// A database with every migration applied.
    pub async fn migrated(backend: Backend) -> Self {
        let db = Self::empty(backend).await;
        let open = db.open().await;
        migrations::up(&open).await.expect("migrations apply");
        open.close().await;
        db
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens the database with a pool of its own.
    pub async fn open(&self) -> Database {
        Database::connect(&self.url, 16)
            .await
            .expect("opening the test database")
    }
}

impl Drop for TestDb {
    /// Scans the audit log the test left for anything like key material, then removes the
    /// database. Every test that writes goes through here, so the whole suite's events are
    /// checked.
    fn drop(&mut self) {
        let (backend, url, place) = (self.backend, self.url.clone(), self.place.clone());
        // Drop runs outside async context; use a runtime of its own on a plain thread.
        let leaks = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let leaks = match Database::connect(&url, 1).await {
                    Ok(db) => {
                        let leaks = audit_leaks(&db).await;
                        db.close().await;
                        leaks
                    }
                    Err(_) => Vec::new(),
                };
                match backend {
                    Backend::Sqlite => drop(std::fs::remove_dir_all(&place)),
                    Backend::Postgres => {
                        if let Ok(mut conn) = PgConnection::connect(admin_url()).await {
                            let _ = conn
                                .execute(
                                    format!("DROP DATABASE IF EXISTS {place} WITH (FORCE)")
                                        .as_str(),
                                )
                                .await;
                        }
                    }
                }
                leaks
            })
        })
        .join()
        .unwrap_or_default();
        if !leaks.is_empty() && !std::thread::panicking() {
            panic!("audit metadata holds what looks like secret material: {leaks:?}");
        }
    }
}

/// Every audit event's metadata that looks like key material, a blob, a token or a code.
async fn audit_leaks(db: &Database) -> Vec<String> {
    let Ok(events) = (async {
        let mut all = Vec::new();
        for event in crate::store::AuditEvent::ALL {
            all.extend(
                db.audit_metadata_checked(event.as_str())
                    .await?
                    .into_iter()
                    .map(|m| (event.as_str(), m)),
            );
        }
        Ok::<_, sqlx::Error>(all)
    })
    .await
    else {
        return Vec::new(); // no schema (a migration test reverted it)
    };
    events
        .into_iter()
        .filter_map(|(event, metadata)| {
            secret_looking(&metadata, "$").map(|why| format!("{event}: {why}"))
        })
        .collect()
}

/// Why a metadata value looks secret, if it does: a field named after secret material, a long
/// hex or base64 string, a JWT, or an array of byte values.
pub fn secret_looking(value: &serde_json::Value, path: &str) -> Option<String> {
    const NAMES: [&str; 9] = [
        "private",
        "secret",
        "token",
        "signature",
        "state",
        "blob",
        "code",
        "passphrase",
        "public",
    ];
    match value {
        serde_json::Value::Object(map) => map.iter().find_map(|(name, v)| {
            let lower = name.to_ascii_lowercase();
            // sqlx's slow-statement warnings carry the SQL text, never its bound values; its
            // `statement` would otherwise read as session state.
            let lower = lower.replace("statement", "");
            NAMES
                .iter()
                .find(|word| lower.contains(*word))
                .map(|word| format!("{path}.{name} is named like {word} material"))
                .or_else(|| secret_looking(v, &format!("{path}.{name}")))
        }),
        serde_json::Value::Array(items) => {
            if items.len() >= 16 && items.iter().all(serde_json::Value::is_number) {
                return Some(format!("{path} is an array of {} numbers", items.len()));
            }
            items
                .iter()
                .enumerate()
                .find_map(|(i, v)| secret_looking(v, &format!("{path}[{i}]")))
        }
        serde_json::Value::String(text) => {
            let hex = text.len() >= 32 && text.bytes().all(|b| b.is_ascii_hexdigit());
            let base64 = text.len() >= 40
                && text.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
                });
            // Three base64url parts: a header, claims and a signature.
            let jwt = text.len() >= 40
                && text.split('.').count() == 3
                && text.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
                });
            (hex || base64 || jwt)
                .then(|| format!("{path} holds a {}-character encoded value", text.len()))
        }
        _ => None,
    }
}

/// `at` as an SQL literal both backends read as a stored time: SQLite's storage format, which
/// PostgreSQL reads as a timestamptz.
pub fn time_literal(at: OffsetDateTime) -> String {
    crate::store::timestamp_text(at)
}

/// Queries the tests make to check what the server wrote, on either backend. SQL given once
/// must mean the same on both (booleans as `WHERE is_consumed`, no casts).
impl Database {
    /// Runs `sql` (no parameters).
    pub async fn execute(&self, sql: &str) {
        match self {
            Database::Postgres(s) => drop(sqlx::raw_sql(sql).execute(s.pool()).await.expect(sql)),
            Database::Sqlite(s) => drop(sqlx::raw_sql(sql).execute(s.pool()).await.expect(sql)),
        }
    }

    /// Runs `postgres` or `sqlite`, whichever fits this database.
    pub async fn execute_either(&self, postgres: &str, sqlite: &str) {
        match self {
            Database::Postgres(_) => self.execute(postgres).await,
            Database::Sqlite(_) => self.execute(sqlite).await,
        }
    }

    /// Sets `column` of the rows of `table` that match `filter` to `at` (a test placing rows
    /// in time).
    pub async fn set_time(&self, table: &str, column: &str, filter: &str, at: OffsetDateTime) {
        let at = time_literal(at);
        self.execute(&format!(
            "UPDATE {table} SET {column} = '{at}' WHERE {filter}"
        ))
        .await;
    }

    /// The single integer `sql` selects, if it selects a row.
    pub async fn integer(&self, sql: &str) -> Option<i64> {
        match self {
            Database::Postgres(s) => sqlx::query_scalar::<_, Option<i64>>(sql)
                .fetch_optional(s.pool())
                .await
                .expect(sql)
                .flatten(),
            Database::Sqlite(s) => sqlx::query_scalar::<_, Option<i64>>(sql)
                .fetch_optional(s.pool())
                .await
                .expect(sql)
                .flatten(),
        }
    }

    /// `SELECT count(*) …` as a number.
    pub async fn count(&self, sql: &str) -> i64 {
        self.integer(sql).await.unwrap_or(0)
    }

    /// The metadata of every audit event of `event_type`, oldest first.
    pub async fn audit_metadata(&self, event_type: &str) -> Vec<serde_json::Value> {
        self.audit_metadata_checked(event_type)
            .await
            .expect("reading the audit log")
    }

    async fn audit_metadata_checked(
        &self,
        event_type: &str,
    ) -> Result<Vec<serde_json::Value>, sqlx::Error> {
        let sql = "SELECT metadata FROM nchat_e2ee_audit_log WHERE event_type = $1 ORDER BY id";
        Ok(match self {
            Database::Postgres(s) => sqlx::query_scalar::<_, Option<serde_json::Value>>(sql)
                .bind(event_type)
                .fetch_all(s.pool())
                .await?
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect(),
            Database::Sqlite(s) => sqlx::query_scalar::<_, Option<String>>(sql)
                .bind(event_type)
                .fetch_all(s.pool())
                .await?
                .iter()
                .map(|text| {
                    text.as_deref().map_or(serde_json::Value::Null, |t| {
                        serde_json::from_str(t).expect("metadata is JSON")
                    })
                })
                .collect(),
        })
    }

    /// Names of the tables, views and `idx_` indexes, sorted.
    pub async fn schema_objects(&self) -> Vec<String> {
        match self {
            Database::Postgres(s) => sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'public'
                   AND ((c.relkind IN ('r', 'm', 'v') AND c.relname LIKE 'nchat\\_%')
                        OR (c.relkind = 'i' AND c.relname LIKE 'idx\\_%'))
                 ORDER BY 1",
            )
            .fetch_all(s.pool())
            .await
            .expect("listing the schema"),
            Database::Sqlite(s) => sqlx::query_scalar(
                "SELECT name FROM sqlite_master
                 WHERE name LIKE 'nchat\\_%' ESCAPE '\\' OR name LIKE 'idx\\_%' ESCAPE '\\'
                 ORDER BY 1",
            )
            .fetch_all(s.pool())
            .await
            .expect("listing the schema"),
        }
    }
}

/// A key server serving on a loopback port until stopped.
pub struct TestServer {
    /// The server's address, for example `http://127.0.0.1:40123`.
    pub url: String,
    /// The server's database, for checking what the server wrote.
    pub db: Database,
    /// The store the server serves from (its fetch batches can be counted).
    pub store: Store,
    tokens: TokenAuthority,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The token secret test servers share, so a token works on every server of a test.
pub const TEST_SECRET: &[u8] = b"keyserver test secret, 32+ bytes long";

/// How a test server is configured beyond its database.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub clock: Clock,
    pub schedule: Schedule,
    pub rotation: RotationPolicy,
    pub cleanup: CleanupSettings,
    /// Which devices fetches serve (`--require-pqxdh`).
    pub serve: Serve,
    /// TLS on the listener (the URL is then https://).
    pub tls: Option<TlsFiles>,
    pub edge: EdgeSettings,
    /// Rate limits and the device quota; off unless a test sets them (other tests fetch one
    /// device far more often than a sender would).
    pub limits: LimitArgs,
    /// What counts as a drain: `serve`'s default.
    pub drain: DrainArgs,
    /// Fetch batches on the database at once (`--fetch-batches`).
    pub fetch_batches: usize,
    /// How long a retried fetch gets the same keys (`--fetch-retry-window`).
    pub fetch_retry_window: Duration,
    /// The read replicas' URL (`--read-database-url`).
    pub read_replica: Option<String>,
}

impl Default for TestConfig {
    /// The defaults of `keyserver serve`, except that only the bundle view refresher runs (and
    /// quickly); tests run the other jobs themselves.
    fn default() -> Self {
        Self {
            clock: Clock::System,
            schedule: Schedule {
                bundle_view_refresh: Duration::from_millis(200),
                ..Schedule::NONE
            },
            rotation: RotationPolicy::default(),
            cleanup: CleanupSettings::default(),
            serve: Serve::Mixed,
            tls: None,
            edge: EdgeSettings::default(),
            limits: LimitArgs::off(),
            drain: DrainArgs::default(),
            fetch_batches: DEFAULT_BATCHES_IN_FLIGHT,
            fetch_retry_window: Duration::from_secs(600),
            read_replica: None,
        }
    }
}

impl TestConfig {
    /// The jobs of a server with this configuration on `db`.
    pub fn jobs(&self, db: &Database) -> Jobs {
        Jobs::new(
            db.store(),
            self.rotation,
            self.cleanup,
            self.drain.rule(),
            self.clock.clone(),
        )
    }
}

impl TestServer {
    /// Starts a server on `db` (which must be migrated).
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, TestConfig::default()).await
    }

    /// Starts a server on `db` over TLS, with a self-signed certificate for `localhost` and
    /// 127.0.0.1 written into `dir`; returns it and the certificate clients are to trust.
    pub async fn start_tls(db: &TestDb, dir: &Path) -> (Self, PathBuf) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        crate::edge::tls::write_self_signed(
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            &cert,
            &key,
        )
        .expect("a self-signed certificate");
        let tls = TlsFiles {
            cert: cert.clone(),
            key,
            client_ca: None,
        };
        let config = TestConfig {
            tls: Some(tls),
            ..TestConfig::default()
        };
        (Self::start_with(db, config).await, cert)
    }

    /// Starts a server on `db` configured by `config`.
    pub async fn start_with(db: &TestDb, config: TestConfig) -> Self {
        logs::capture();
        let db = db.open().await;
        let tokens =
            TokenAuthority::new(&[TEST_SECRET.to_vec()], TokenPolicy::default()).expect("secret");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", listener.local_addr().expect("address"));
        let stop = CancellationToken::new();
        let mut store = db.store().with_fetch_batches(config.fetch_batches);
        if let Some(url) = &config.read_replica {
            let replica = Database::connect_replica(url, 4).expect("a replica URL");
            store = store.with_read_replica(replica);
        }
        let parts = ServerParts {
            store: store.clone(),
            tokens: tokens.clone(),
            jobs: config.jobs(&db),
            schedule: config.schedule,
            rotation: config.rotation,
            limits: Limits::new(&config.limits, config.clock.clone()).expect("rate limits"),
            max_devices_per_user: config.limits.max_devices_per_user,
            fetch_retry_window: config.fetch_retry_window,
            clock: config.clock,
            min_pbkdf2_iterations: 100_000,
            serve: config.serve,
            tls: config.tls,
            edge: config.edge,
        };
        let task = tokio::spawn(server::run(listener, parts, stop.clone()));
        Self {
            url,
            db,
            store,
            tokens,
            stop,
            task: Some(task),
        }
    }

    /// A valid token for `user` bound to no device: it reads, fetches and registers new
    /// devices.
    pub fn token(&self, user: Uuid) -> String {
        self.tokens
            .mint(user, None, Duration::from_secs(3600))
            .expect("minting")
    }

    /// A valid token for `device` of `user`: it may also change that device.
    pub fn device_token(&self, user: Uuid, device: &str) -> String {
        let device = DeviceId::parse(device).expect("a valid device id");
        self.tokens
            .mint(user, Some(&device), Duration::from_secs(3600))
            .expect("minting")
    }

    /// Stops the server gracefully and reports how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.take().expect("running").await?
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        // Every test that ran a server checks what the servers of this process logged so far.
        if !std::thread::panicking() {
            logs::assert_no_secrets();
        }
    }
}

/// What the test servers of this process log, kept to be scanned for secrets: the same check
/// the audit metadata gets, over every line, at debug level.
mod logs {
    use std::io::Write;
    use std::sync::{Mutex, Once};

    /// The lines logged so far, and how far they have been scanned.
    static LOGGED: Mutex<(Vec<u8>, usize)> = Mutex::new((Vec::new(), 0));

    struct Capture;

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LOGGED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Installs the capturing logger once per process (JSON lines, the key server at debug).
    pub fn capture() {
        static INSTALLED: Once = Once::new();
        INSTALLED.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .json()
                .with_current_span(true)
                .with_writer(|| Capture)
                .with_env_filter("warn,keyserver=debug")
                .try_init();
        });
    }

    /// Panics naming the first line logged since the last scan that holds secret-looking
    /// material (a token, a key, a blob, a recovery code).
    pub fn assert_no_secrets() {
        let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
        let (text, scanned) = &mut *logged;
        let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let fresh = String::from_utf8_lossy(&text[*scanned..end]).into_owned();
        *scanned = end;
        drop(logged);
        for line in fresh.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
            if let Some(why) = super::secret_looking(&value, "$") {
                panic!("a test server logged secret-looking material ({why}): {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::secret_looking;
    use serde_json::json;

    #[test]
    fn the_audit_scan_flags_secret_material_and_passes_real_metadata() {
        let real = json!({
            "outcome": "created", "registration_id": 4242, "signed_prekey_id": 16777215,
            "one_time_prekeys_uploaded": 100, "previous_signed_prekey_id": null,
            "peer_user_id": "6f1e0c3a-8f5b-4d7e-9c2a-1b3d5f7a9c0e", "peer_device_id": "phone-1",
            "is_initiator": true,
        });
        assert_eq!(secret_looking(&real, "$"), None);
        let log_line = json!({
            "span": { "method": "/keyserver.v1.KeyService/FetchPreKeyBundle",
                      "request_id": "1a8bcadf-cb07-4840-a379-32e963b27851" },
            "fields": { "status": "OK", "duration_ms": 0.3 },
        });
        assert_eq!(secret_looking(&log_line, "$"), None);
        let key = "05".repeat(33);
        for leak in [
            json!({ "identity": key }),
            json!({ "nested": { "k": "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq83v" } }),
            json!({ "t": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz" }),
            json!({ "bytes": (0..32).collect::<Vec<u8>>() }),
            json!({ "encrypted_private_key": "x" }),
            json!({ "recovery_code": "x" }),
            json!({ "session_state": 1 }),
        ] {
            assert!(secret_looking(&leak, "$").is_some(), "not flagged: {leak}");
        }
    }
}
