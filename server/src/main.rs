//! The `keyserver` command: serve the API, manage the schema, mint tokens.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyserver::auth::TokenAuthority;
use keyserver::config::{DataDirArgs, DatabaseArgs, SecretArgs, ServeArgs};
use keyserver::secret;
use keyserver::server::{self, ServerParts};
use keyserver::shutdown::{self, CancellationToken};
use keyserver::store::database::Database;
use keyserver::store::{migrations, transfer};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "keyserver", version, about = "Signal-protocol key server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (applies pending migrations first).
    Serve(ServeArgs),
    /// Apply, revert or list schema migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
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
    /// Mint a bearer token for a user, signed with the server's secret.
    Token {
        /// The user id (UUID) the token speaks for.
        #[arg(long)]
        user: Uuid,
        /// How long the token is valid, for example 30m, 12h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        data: DataDirArgs,
        #[command(flatten)]
        secret: SecretArgs,
    },
}

#[derive(Subcommand)]
enum DbAction {
    /// Copy every row from one database to another, then verify the copy. The source is never
    /// changed; the target is migrated, must be empty (or --replace), and is filled in one
    /// transaction. Exits non-zero when the copy does not match.
    Copy {
        /// The database to copy from (postgres://… or sqlite://…).
        #[arg(long)]
        from: String,
        /// The database to copy into.
        #[arg(long)]
        to: String,
        /// Delete the target's key-server rows before copying instead of refusing.
        #[arg(long)]
        replace: bool,
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
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the newest applied migration, or all newer than --to.
    Down {
        /// Revert every migration newer than this version (0 reverts all).
        #[arg(long)]
        to: Option<i64>,
    },
    /// List migrations and whether each is applied.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYSERVER_LOG")
                .unwrap_or_else(|_| "info,sqlx::postgres::notice=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate {
            action,
            data,
            database,
        } => migrate(action, &connect(&database, &data).await?).await,
        Command::Db { action } => db(action).await,
        Command::Token {
            user,
            ttl,
            data,
            secret,
        } => {
            let key = secret::load_or_create(secret.token_secret.as_deref(), &data)?;
            println!("{}", TokenAuthority::new(&key)?.mint(user, ttl));
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
    tracing::info!(backend = db.backend(), "database open");
    Ok(db)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let db = connect(&args.database, &args.data).await?;
    migrations::up(&db)
        .await
        .context("the database schema cannot be used")?;
    let key = secret::load_or_create(args.secret.token_secret.as_deref(), &args.data)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let stop = CancellationToken::new();
    shutdown::cancel_on_signal(stop.clone());
    server::run(
        listener,
        ServerParts {
            store: db.store(),
            tokens: TokenAuthority::new(&key)?,
            bundle_view_refresh: args.bundle_view_refresh,
            min_pbkdf2_iterations: args.min_pbkdf2_iterations,
        },
        stop,
    )
    .await
}

async fn open(url: &str) -> anyhow::Result<Database> {
    Database::connect(url, 4)
        .await
        .with_context(|| format!("opening {}", url.split('@').next_back().unwrap_or(url)))
}

async fn db(action: DbAction) -> anyhow::Result<()> {
    let report = match action {
        DbAction::Copy { from, to, replace } => {
            let (source, target) = (open(&from).await?, open(&to).await?);
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<24} [{bar:40}] {pos}/{len} rows ({per_sec})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            let started = std::time::Instant::now();
            let report = transfer::copy(&source, &target, replace, &mut |table, done, total| {
                if done == 0 {
                    bar.set_message(table.to_owned());
                    bar.set_length(total);
                    bar.reset();
                }
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            println!(
                "copied {} → {} in {:.1?}",
                source.backend(),
                target.backend(),
                started.elapsed()
            );
            report
        }
        DbAction::Verify { from, to } => {
            transfer::verify(&open(&from).await?, &open(&to).await?).await?
        }
    };
    println!("{report}");
    anyhow::ensure!(report.matches(), "the databases differ");
    Ok(())
}

async fn migrate(action: MigrateAction, db: &Database) -> anyhow::Result<()> {
    match action {
        MigrateAction::Up => {
            migrations::up(db).await?;
            println!(
                "schema is at version {:?}",
                migrations::current_version(db).await?
            );
        }
        MigrateAction::Down { to } => {
            let target = match to {
                Some(version) => version,
                None => {
                    let applied: Vec<i64> = migrations::status(db)
                        .await?
                        .into_iter()
                        .filter(|m| m.applied)
                        .map(|m| m.version)
                        .collect();
                    anyhow::ensure!(!applied.is_empty(), "no migration is applied");
                    // The version before the newest applied one; 0 reverts the only one.
                    applied.iter().rev().nth(1).copied().unwrap_or(0)
                }
            };
            migrations::down_to(db, target).await?;
            println!(
                "schema is at version {:?}",
                migrations::current_version(db).await?
            );
        }
        MigrateAction::Status => {
            for m in migrations::status(db).await? {
                let state = if m.applied { "applied" } else { "pending" };
                println!("{:>4}  {state:<8} {}", m.version, m.description);
            }
        }
    }
    Ok(())
}
