//! `db copy` row decoding: any values a SQLite source holds in any of the copied tables' columns
//! (SQLite stores any type in any column, so a database another tool wrote may hold integers in
//! a text column, invalid UTF-8, reals, huge blobs) are decoded without a panic, and a row that
//! decodes is written to a target so that `db verify`'s checksum finds it unchanged.
#![no_main]

use std::cell::RefCell;

use keyserver::store::transfer::TABLES;
use keyserver::store::transfer::rows::{Checksum, Conn};
use libfuzzer_sys::fuzz_target;
use sqlx::{Connection, SqliteConnection};

struct Databases {
    runtime: tokio::runtime::Runtime,
    source: SqliteConnection,
    target: SqliteConnection,
}

/// Two in-memory databases with every copied table, its columns untyped so that the source
/// can hold whatever the input says.
fn open() -> Databases {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let (source, target) = runtime.block_on(async {
        let mut pair = Vec::new();
        for _ in 0..2 {
            let mut conn = SqliteConnection::connect("sqlite::memory:")
                .await
                .expect("an in-memory database");
            for table in TABLES {
                let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
                let create = format!("CREATE TABLE {} ({})", table.name, columns.join(", "));
                sqlx::raw_sql(&create)
                    .execute(&mut conn)
                    .await
                    .expect("creating a table");
            }
            pair.push(conn);
        }
        let target = pair.pop().expect("two");
        (pair.pop().expect("two"), target)
    });
    Databases {
        runtime,
        source,
        target,
    }
}

thread_local! {
    static DATABASES: RefCell<Databases> = RefCell::new(open());
}

/// One SQLite value from the front of `input`: a tag byte, then its bytes.
enum Stored {
    Null,
    Integer(i64),
    Real(f64),
    /// Bytes stored as TEXT, valid UTF-8 or not.
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

fn take(input: &mut &[u8], n: usize) -> Vec<u8> {
    let n = n.min(input.len());
    let (head, rest) = input.split_at(n);
    *input = rest;
    head.to_vec()
}

/// Eight bytes, zero-padded where the input ends.
fn eight(input: &mut &[u8]) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    let head = take(input, 8);
    bytes[..head.len()].copy_from_slice(&head);
    bytes
}

/// A length byte, then that many bytes (fewer where the input ends).
fn counted(input: &mut &[u8]) -> Vec<u8> {
    let len = take(input, 1).first().copied().unwrap_or(0);
    take(input, usize::from(len))
}

fn stored(input: &mut &[u8]) -> Stored {
    let tag = take(input, 1).first().copied().unwrap_or(0);
    match tag % 5 {
        0 => Stored::Null,
        1 => Stored::Integer(i64::from_le_bytes(eight(input))),
        2 => Stored::Real(f64::from_le_bytes(eight(input))),
        3 => Stored::Text(counted(input)),
        _ => Stored::Blob(counted(input)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, mut input)) = data.split_first() else {
        return;
    };
    let table = &TABLES[usize::from(which) % TABLES.len()];
    let values: Vec<Stored> = table.columns.iter().map(|_| stored(&mut input)).collect();
    DATABASES.with(|databases| {
        let databases = &mut *databases.borrow_mut();
        let Databases {
            runtime,
            source,
            target,
        } = databases;
        runtime.block_on(async {
            let marks: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Stored::Text(_) => format!("CAST(?{} AS TEXT)", i + 1),
                    _ => format!("?{}", i + 1),
                })
                .collect();
            let insert = format!("INSERT INTO {} VALUES ({})", table.name, marks.join(", "));
            let mut q = sqlx::query(&insert);
            for value in &values {
                q = match value {
                    Stored::Null => q.bind(None::<i64>),
                    Stored::Integer(v) => q.bind(*v),
                    Stored::Real(v) => q.bind(*v),
                    Stored::Text(v) | Stored::Blob(v) => q.bind(v.clone()),
                };
            }
            let clear = format!("DELETE FROM {}", table.name);
            sqlx::raw_sql(&clear).execute(&mut *source).await.unwrap();
            q.execute(&mut *source).await.expect("storing the row");

            let Ok(rows) = Conn::Sqlite(&mut *source).read_batch(table, None, 10).await else {
                return; // refused as undecodable: db copy stops with an error, which is right
            };
            assert_eq!(rows.len(), 1);
            sqlx::raw_sql(&clear).execute(&mut *target).await.unwrap();
            Conn::Sqlite(&mut *target)
                .insert_batch(table, &rows)
                .await
                .expect("writing a decoded row");
            let copied = Conn::Sqlite(&mut *target)
                .read_batch(table, None, 10)
                .await
                .expect("a written row decodes");
            let checksum = |rows: &[Vec<_>]| {
                let mut sum = Checksum::default();
                rows.iter().for_each(|row| sum.add(row));
                sum
            };
            assert_eq!(
                checksum(&rows),
                checksum(&copied),
                "{rows:?} became {copied:?}"
            );
        });
    });
});
