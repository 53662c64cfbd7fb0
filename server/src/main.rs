//! The `keyserver` command: serve the API, run the maintenance jobs, manage the schema, mint
//! tokens, make a TLS certificate to try TLS with.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyserver::clock::Clock;
use keyserver::config::{
    CleanupSettings, DataDirArgs, DatabaseArgs, DrainArgs, RotationPolicy, SecretArgs, ServeArgs,
};
use keyserver::edge;
use keyserver::jobs::{Job, Jobs, Run, Trigger, when};
use keyserver::limits::Limits;
use keyserver::logging::{self, LogFormat};
use keyserver::secret::{self, Missing};
use keyserver::server::{self, ServerParts};
use keyserver::shutdown::{self, CancellationToken};
use keyserver::store::backup::{self, Backup};
use keyserver::store::database::{Database, display_url};
use keyserver::store::fence;
use keyserver::store::{Backend, DeviceId, Serve};
use keyserver::store::{migrations, transfer};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "keyserver", version, about = "Signal-protocol key server")]
struct Cli {
    /// How log lines are written to stderr: text, or JSON lines for log shippers.
    #[arg(
        long,
        global = true,
        env = "KEYSERVER_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (applies pending migrations first).
    Serve(Box<ServeArgs>),
    /// Apply, revert or list schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
        #[command(flatten)]
        data: DataDirArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Run a maintenance job now (for cron), or list recent runs (applies pending migrations
    /// first). A job already running in another process is not run twice: the command says so
    /// and exits 0.
    Jobs {
        #[command(subcommand)]
        action: JobAction,
        #[command(flatten)]
        data: DataDirArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Copy or compare whole databases (SQLite to PostgreSQL, or back).
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Mint a bearer token for a user, or for one device of a user, signed with the server's
    /// secret (never a new one: it refuses when it finds none).
    Token {
        /// The user id (UUID) the token speaks for.
        #[arg(long)]
        user: Uuid,
        /// The device the token is bound to; needed to change an existing device (upload,
        /// rotate, re-register, remove, write sessions). Without it the token may read, fetch
        /// and register a new device.
        #[arg(long, value_parser = parse_device)]
        device: Option<DeviceId>,
        /// How long the token is valid, for example 30m, 12h, 7d (at most --token-max-ttl).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        data: DataDirArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// TLS helpers.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
}

#[derive(Subcommand)]
enum TlsAction {
    /// Write a self-signed certificate and its key (PEM) for trying TLS; production servers
    /// use a certificate from their CA.
    SelfSigned {
        /// Host names (and IP addresses) the certificate is for.
        #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        names: Vec<String>,
        /// Where to write the certificate.
        #[arg(long, default_value = "keyserver-cert.pem")]
        cert: std::path::PathBuf,
        /// Where to write the private key (created owner-only).
        #[arg(long, default_value = "keyserver-key.pem")]
        key: std::path::PathBuf,
    },
}

fn parse_device(value: &str) -> Result<DeviceId, String> {
    DeviceId::parse(value)
}

/// The two databases of a copy or a cutover.
#[derive(clap::Args)]
struct CopyArgs {
    /// The database to copy from, whose servers stop in a cutover (postgres://… or
    /// sqlite://…).
    #[arg(long)]
    from: String,
    /// The database to copy into.
    #[arg(long)]
    to: String,
    /// Delete the target's key-server rows before copying instead of refusing (in a cutover,
    /// the way back to a database an earlier cutover fenced).
    #[arg(long)]
    replace: bool,
}

#[derive(Subcommand)]
enum DbAction {
    /// Copy every row from one database to another, then verify the copy. The source is never
    /// changed; the target is migrated, must be empty (or --replace), and is filled in one
    /// transaction. Exits non-zero when the copy does not match.
    Copy(CopyArgs),
    /// Move the keys from one database to another with no key ever handed out by both: fence
    /// the source (every server on it finishes the calls in flight, then refuses key-taking
    /// and writing calls with FAILED_PRECONDITION naming the target), copy it as `db copy`
    /// does, and verify. Then start the servers on the target. Also the way back (a rollback):
    /// the target's own fence is lifted by the copy.
    Cutover(CopyArgs),
    /// Back a database up to a new file before a destructive step: SQLite writes a
    /// consistent copy while servers run (VACUUM INTO); for PostgreSQL it runs pg_dump
    /// (custom format, for pg_restore) and prints the command.
    Backup {
        /// The database (postgres://… or sqlite://…).
        #[arg(long)]
        database: String,
        /// The file to write; must not exist.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Lift a cutover fence, so servers on the database serve again. Only when no server on
    /// the database the keys moved to has handed out a key; otherwise cut over back instead.
    Unfence {
        /// The fenced database.
        #[arg(long)]
        database: String,
    },
    /// Compare two databases table by table (counts, checksums, foreign keys); exits non-zero
    /// when they differ.
    Verify {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum JobAction {
    /// Report active signed prekeys past the rotation age and the stale age.
    Rotate {
        #[command(flatten)]
        policy: RotationPolicy,
    },
    /// Delete consumed one-time prekeys, superseded signed prekeys, audit events and job
    /// records past their retention, in batches.
    Cleanup {
        #[command(flatten)]
        settings: CleanupSettings,
        /// Count what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Refresh the nchat_prekey_bundles materialized view.
    RefreshBundles,
    /// Report devices whose one-time prekeys were taken faster than the drain rule allows, or
    /// mostly by one requester, on their owners' audit trails.
    DrainCheck {
        #[command(flatten)]
        rule: DrainArgs,
    },
    /// The latest runs of every job (or one), newest first.
    Status {
        /// Only this job (rotate, cleanup, refresh-bundles, drain-check).
        #[arg(long, value_parser = parse_job)]
        job: Option<Job>,
        /// How many runs to list.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON array of the runs, for scripts and monitoring.
        #[arg(long)]
        json: bool,
    },
}

fn parse_job(name: &str) -> Result<Job, String> {
    Job::from_name(name)
        .ok_or_else(|| "expected rotate, cleanup, refresh-bundles or drain-check".to_owned())
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the newest applied migration, or all newer than --to. Lists the tables and
    /// columns it would drop with their rows first, and refuses without --yes when any holds
    /// data (back it up first: `keyserver db backup`).
    Down {
        /// Revert every migration newer than this version (0 reverts all).
        #[arg(long)]
        to: Option<i64>,
        /// Revert even though data would be deleted.
        #[arg(long)]
        yes: bool,
    },
    /// List migrations and whether each is applied.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs go to stderr; stdout is the commands' output (reports a cron job mails, tokens).
    let _log_writer = logging::init(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate {
            action,
            data,
            database,
        } => migrate(action, &connect(&database, &data).await?).await,
        Command::Jobs {
            action,
            data,
            database,
        } => jobs(action, &connect(&database, &data).await?).await,
        Command::Db { action } => db(action).await,
        Command::Token {
            user,
            device,
            ttl,
            data,
            secret,
        } => {
            let authority = secret::authority(&secret, &data, Missing::Refuse)?;
            println!("{}", authority.mint(user, device.as_ref(), ttl)?);
            Ok(())
        }
        Command::Tls {
            action: TlsAction::SelfSigned { names, cert, key },
        } => {
            edge::tls::write_self_signed(&names, &cert, &key)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
    }
}

async fn connect(database: &DatabaseArgs, data: &DataDirArgs) -> anyhow::Result<Database> {
    let url = database.url(data)?;
    let db = Database::connect(&url, database.max_connections)
        .await
        .context(
            "opening the database (DATABASE_URL, or the embedded one in the data directory)",
        )?;
    tracing::info!(backend = db.backend().as_str(), "database open");
    Ok(db)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Cleanup deletes consumed keys after their retention: a retry after that could not be
    // answered with the same keys.
    anyhow::ensure!(
        args.fetch_retry_window <= args.cleanup.consumed_prekey_retention,
        "--fetch-retry-window ({}) must not be longer than --consumed-prekey-retention ({})",
        humantime::format_duration(args.fetch_retry_window),
        humantime::format_duration(args.cleanup.consumed_prekey_retention),
    );
    let db = connect(&args.database, &args.data).await?;
    migrations::up(&db)
        .await
        .context("the database schema cannot be used")?;
    let tokens = secret::authority(&args.secret, &args.data, Missing::Create)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let stop = CancellationToken::new();
    let exporter = match args.metrics_listen {
        Some(addr) => Some(edge::metrics::serve(addr, stop.clone()).await?),
        None => None,
    };
    let mut store = db.store().with_fetch_batches(args.fetch_batches.into());
    if let Some(url) = args.read_database_url.as_deref().filter(|u| !u.is_empty()) {
        anyhow::ensure!(
            db.backend() == Backend::Postgres,
            "--read-database-url needs a PostgreSQL primary (--database-url postgres://…)"
        );
        let replica = Database::connect_replica(url, args.database.max_connections)
            .context("the read replicas (--read-database-url)")?;
        store = store.with_read_replica(replica);
        tracing::info!("key-less reads go to the read replicas");
    }
    shutdown::cancel_on_signal(stop.clone());
    server::run(
        listener,
        ServerParts {
            store,
            tokens,
            jobs: Jobs::new(
                db.store(),
                args.rotation,
                args.cleanup,
                args.drain.rule(),
                Clock::System,
            ),
            schedule: args.schedule,
            rotation: args.rotation,
            clock: Clock::System,
            min_pbkdf2_iterations: args.min_pbkdf2_iterations,
            serve: if args.require_pqxdh {
                Serve::PqxdhOnly
            } else {
                Serve::Mixed
            },
            tls: args.tls.files(),
            edge: args.edge,
            limits: Limits::new(&args.limits, Clock::System)?,
            max_devices_per_user: args.limits.max_devices_per_user,
            fetch_retry_window: args.fetch_retry_window,
        },
        stop,
    )
    .await?;
    if let Some(exporter) = exporter {
        exporter.await?;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn jobs(action: JobAction, db: &Database) -> anyhow::Result<()> {
    migrations::up(db)
        .await
        .context("the database schema cannot be used")?;
    // Each job's own settings from its flags, the others' defaults (they are not used).
    let (mut rotation, mut cleanup, mut drain) = Default::default();
    let (job, dry_run) = match action {
        JobAction::Status { job, limit, json } => {
            let runs = db.store().job_runs(job, limit).await?;
            if json {
                let runs: Vec<serde_json::Value> = runs
                    .iter()
                    .map(|run| {
                        serde_json::json!({
                            "id": run.id,
                            "job": run.job.as_str(),
                            "trigger": run.trigger.as_str(),
                            "outcome": run.outcome.as_str(),
                            "started_at": when(run.started_at),
                            "finished_at": run.finished_at.map(when),
                            "counts": run.counts,
                            "message": run.message,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(runs));
                return Ok(());
            }
            if runs.is_empty() {
                println!("no job runs recorded");
            }
            for run in runs {
                let took = run
                    .finished_at
                    .map(|end| format!("{:.1}s", (end - run.started_at).as_seconds_f64()))
                    .unwrap_or_else(|| "-".to_owned());
                println!(
                    "{:>6}  {:<15} {:<8} {:<9} {}  {:>8}  {}{}",
                    run.id,
                    run.job.as_str(),
                    run.trigger.as_str(),
                    run.outcome.as_str(),
                    when(run.started_at),
                    took,
                    run.counts,
                    run.message.map(|m| format!("  {m}")).unwrap_or_default()
                );
            }
            return Ok(());
        }
        JobAction::Cleanup { settings, dry_run } => {
            cleanup = settings;
            (Job::Cleanup, dry_run)
        }
        JobAction::Rotate { policy } => {
            rotation = policy;
            (Job::Rotate, false)
        }
        JobAction::RefreshBundles => (Job::RefreshBundles, false),
        JobAction::DrainCheck { rule } => {
            drain = rule;
            (Job::DrainCheck, false)
        }
    };
    let jobs = Jobs::new(db.store(), rotation, cleanup, drain.rule(), Clock::System);
    if dry_run {
        println!("{}", jobs.cleanup_dry_run().await?);
        return Ok(());
    }
    // Ctrl-C or SIGTERM stops a cleanup between two batches, recorded as such.
    let stop = CancellationToken::new();
    shutdown::cancel_on_signal(stop.clone());
    match jobs.run(job, Trigger::Cli, &stop).await? {
        Run::Finished(report) => {
            println!("{report}");
            anyhow::ensure!(report.completed, "{} was interrupted", job.as_str());
        }
        Run::Skipped(why) => println!("{} not run: {why}", job.as_str()),
    }
    Ok(())
}

async fn open(url: &str) -> anyhow::Result<Database> {
    Database::connect(url, 4)
        .await
        .with_context(|| format!("opening {}", display_url(url)))
}

/// Copies `from` into `to` with a progress bar (rows/s and time left for each table), fencing
/// `from` first for a cutover.
async fn copy(args: &CopyArgs, cutover: bool) -> anyhow::Result<transfer::Report> {
    let CopyArgs { from, to, replace } = args;
    let (source, target) = (open(from).await?, open(to).await?);
    let moved_to = display_url(to);
    // A source from before the fence's migration has none (the copy then says it is not
    // migrated).
    if !cutover && let Ok(Some(f)) = fence::get(&source).await {
        println!(
            "the source is fenced (its keys moved to {} at {})",
            f.moved_to,
            when(f.fenced_at)
        );
    } else if !cutover {
        println!(
            "the source is not fenced: keys a server hands out from it after this snapshot \
             will be handed out again by the target; `keyserver db cutover` fences it first"
        );
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:<24} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta} left)",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let copied = transfer::load(
        &source,
        &target,
        *replace,
        cutover.then_some(moved_to.as_str()),
        &mut |table, done, total| {
            if done == 0 {
                bar.set_message(table.to_owned());
                bar.set_length(total);
                bar.reset();
            }
            bar.set_position(done);
        },
    )
    .await;
    bar.finish_and_clear();
    if cutover && let Some(f) = fence::get(&source).await? {
        println!(
            "fenced {} at {}: its servers refuse key-taking and writing calls, naming {}",
            display_url(from),
            when(f.fenced_at),
            f.moved_to
        );
    }
    copied.with_context(|| {
        if cutover {
            format!(
                "the copy failed; if the source was fenced, it stays fenced: fix the cause and \
                 run the cutover again, or `keyserver db unfence --database {}` to serve from it",
                display_url(from)
            )
        } else {
            "the copy failed; the target was left as it was".to_owned()
        }
    })?;
    let copy_time = started.elapsed();
    println!(
        "copied {} → {} in {:.1?}; verifying",
        source.backend().as_str(),
        target.backend().as_str(),
        copy_time
    );
    let report = transfer::verify(&source, &target).await?;
    println!("verified in {:.1?}", started.elapsed() - copy_time);
    Ok(report)
}

async fn db(action: DbAction) -> anyhow::Result<()> {
    let (report, cutover) = match action {
        DbAction::Copy(args) => (copy(&args, false).await?, None),
        DbAction::Cutover(args) => (copy(&args, true).await?, Some(args.to)),
        DbAction::Verify { from, to } => (
            transfer::verify(&open(&from).await?, &open(&to).await?).await?,
            None,
        ),
        DbAction::Backup { database, out } => {
            let db = open(&database).await?;
            match backup::backup(&db, &database, &out).await? {
                Backup::Written(bytes) => {
                    println!("wrote {} ({bytes} bytes)", out.display())
                }
                Backup::PgDump {
                    program,
                    args,
                    password,
                } => {
                    println!("running {program} {}", args.join(" "));
                    let mut command = std::process::Command::new(program);
                    command.args(&args);
                    if let Some(password) = password {
                        command.env("PGPASSWORD", password);
                    }
                    let status = command.status().with_context(|| {
                        format!("running {program} (install PostgreSQL's client tools)")
                    })?;
                    anyhow::ensure!(status.success(), "{program} failed ({status})");
                    println!("wrote {}; restore with pg_restore", out.display());
                }
            }
            return Ok(());
        }
        DbAction::Unfence { database } => {
            let db = open(&database).await?;
            match fence::lift(&db).await? {
                Some(f) => println!(
                    "lifted the fence of {} (its keys had moved to {} at {}): its servers serve again",
                    display_url(&database),
                    f.moved_to,
                    when(f.fenced_at)
                ),
                None => println!("{} is not fenced", display_url(&database)),
            }
            return Ok(());
        }
    };
    println!("{report}");
    anyhow::ensure!(report.matches(), "the databases differ");
    if let Some(to) = cutover {
        println!(
            "cutover done: start the servers with DATABASE_URL={} (and its password)",
            display_url(&to)
        );
    }
    Ok(())
}

/// The schema version in words.
async fn schema_version(db: &Database) -> anyhow::Result<String> {
    let status = migrations::status(db).await?;
    Ok(
        match status
            .iter()
            .filter(|m| m.applied)
            .max_by_key(|m| m.version)
        {
            Some(m) => format!(
                "schema is at version {} ({}); {} of {} migrations applied",
                m.version,
                m.description,
                status.iter().filter(|m| m.applied).count(),
                status.len()
            ),
            None => "no migration is applied: the schema is empty".to_owned(),
        },
    )
}

async fn migrate(action: MigrateAction, db: &Database) -> anyhow::Result<()> {
    match action {
        MigrateAction::Up => {
            migrations::up(db).await?;
            println!("{}", schema_version(db).await?);
        }
        MigrateAction::Down { to, yes } => {
            let target = match to {
                Some(version) => version,
                None => {
                    let applied: Vec<i64> = migrations::status(db)
                        .await?
                        .into_iter()
                        .filter(|m| m.applied)
                        .map(|m| m.version)
                        .collect();
                    anyhow::ensure!(
                        !applied.is_empty(),
                        "no migration is applied: nothing to revert"
                    );
                    // The version before the newest applied one; 0 reverts the only one.
                    applied.iter().rev().nth(1).copied().unwrap_or(0)
                }
            };
            let plan = migrations::plan_down(db, target).await?;
            if plan.is_empty() {
                println!("nothing to revert: {}", schema_version(db).await?);
                return Ok(());
            }
            let mut lost = 0;
            for revert in &plan {
                println!("revert {:>4}  {}", revert.version, revert.description);
                for drop in &revert.drops {
                    lost += drop.rows;
                    match &drop.column {
                        None => println!("      drops table {} ({} rows)", drop.table, drop.rows),
                        Some(c) => println!(
                            "      drops column {}.{c} ({} rows hold a value)",
                            drop.table, drop.rows
                        ),
                    }
                }
            }
            anyhow::ensure!(
                lost == 0 || yes,
                "not reverted: {lost} rows of data would be deleted. Back the database up first \
                 (`keyserver db backup --database … --out FILE`), then run again with --yes"
            );
            migrations::down_to(db, target).await?;
            println!("reverted; {}", schema_version(db).await?);
        }
        MigrateAction::Status => {
            for m in migrations::status(db).await? {
                let state = if m.applied { "applied" } else { "pending" };
                println!("{:>4}  {state:<8} {}", m.version, m.description);
            }
            println!("{}", schema_version(db).await?);
        }
    }
    Ok(())
}
