//! Rows as `db copy` carries them: read from one backend in key order, written to the other,
//! and hashed the same way on both so a copy can be checked.

use sha2::{Digest, Sha256};
use sqlx::postgres::PgCopyIn;
use sqlx::{PgConnection, Row, SqliteConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use super::tables::{ColumnType, Table};
use crate::store::timestamp_text;

/// One column's value, independent of the backend it came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
    Uuid(Uuid),
    Time(OffsetDateTime),
    Json(serde_json::Value),
}

/// A connection of either backend, inside the caller's transaction.
pub enum Conn<'a> {
    Postgres(&'a mut PgConnection),
    Sqlite(&'a mut SqliteConnection),
}

fn decode_error(e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

/// A time the target can store and read back: RFC 3339 text (SQLite's form) has years 0 to
/// 9999 only, so a source time outside them stops the copy instead of writing what no reader
/// parses (found by the `rows` fuzz target).
fn time_value(t: OffsetDateTime) -> Result<Value, sqlx::Error> {
    if (0..=9999).contains(&t.year()) {
        Ok(Value::Time(t))
    } else {
        Err(decode_error(std::io::Error::other(format!(
            "a timestamp outside the years 0 to 9999: {t}"
        ))))
    }
}

fn pg_value(row: &sqlx::postgres::PgRow, i: usize, ty: ColumnType) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        ColumnType::Int => row
            .try_get::<Option<i32>, _>(i)?
            .map(|v| Value::Int(v.into())),
        ColumnType::Text => row.try_get::<Option<String>, _>(i)?.map(Value::Text),
        ColumnType::Bytes => row.try_get::<Option<Vec<u8>>, _>(i)?.map(Value::Bytes),
        ColumnType::Bool => row.try_get::<Option<bool>, _>(i)?.map(Value::Bool),
        ColumnType::Uuid => row.try_get::<Option<Uuid>, _>(i)?.map(Value::Uuid),
        ColumnType::Time => row
            .try_get::<Option<OffsetDateTime>, _>(i)?
            .map(time_value)
            .transpose()?,
        ColumnType::Json => row
            .try_get::<Option<serde_json::Value>, _>(i)?
            .map(Value::Json),
    }
    .unwrap_or(Value::Null))
}

fn sqlite_value(
    row: &sqlx::sqlite::SqliteRow,
    i: usize,
    ty: ColumnType,
) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        ColumnType::Int => row.try_get::<Option<i64>, _>(i)?.map(Value::Int),
        ColumnType::Text => row.try_get::<Option<String>, _>(i)?.map(Value::Text),
        ColumnType::Bytes => row.try_get::<Option<Vec<u8>>, _>(i)?.map(Value::Bytes),
        ColumnType::Bool => row.try_get::<Option<bool>, _>(i)?.map(Value::Bool),
        ColumnType::Uuid => match row.try_get::<Option<String>, _>(i)? {
            Some(text) => Some(Value::Uuid(Uuid::parse_str(&text).map_err(decode_error)?)),
            None => None,
        },
        ColumnType::Time => row
            .try_get::<Option<OffsetDateTime>, _>(i)?
            .map(time_value)
            .transpose()?,
        ColumnType::Json => match row.try_get::<Option<String>, _>(i)? {
            Some(text) => Some(Value::Json(
                serde_json::from_str(&text).map_err(decode_error)?,
            )),
            None => None,
        },
    }
    .unwrap_or(Value::Null))
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;
type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_pg<'q>(q: PgQuery<'q>, value: &Value, ty: ColumnType) -> PgQuery<'q> {
    match (value, ty) {
        (Value::Int(v), _) => q.bind(*v as i32),
        (Value::Text(v), _) => q.bind(v.clone()),
        (Value::Bytes(v), _) => q.bind(v.clone()),
        (Value::Bool(v), _) => q.bind(*v),
        (Value::Uuid(v), _) => q.bind(*v),
        (Value::Time(v), _) => q.bind(*v),
        (Value::Json(v), _) => q.bind(v.clone()),
        (Value::Null, ColumnType::Int) => q.bind(None::<i32>),
        (Value::Null, ColumnType::Text) => q.bind(None::<String>),
        (Value::Null, ColumnType::Bytes) => q.bind(None::<Vec<u8>>),
        (Value::Null, ColumnType::Bool) => q.bind(None::<bool>),
        (Value::Null, ColumnType::Uuid) => q.bind(None::<Uuid>),
        (Value::Null, ColumnType::Time) => q.bind(None::<OffsetDateTime>),
        (Value::Null, ColumnType::Json) => q.bind(None::<serde_json::Value>),
    }
}

fn bind_sqlite<'q>(q: SqliteQuery<'q>, value: &Value, ty: ColumnType) -> SqliteQuery<'q> {
    match (value, ty) {
        (Value::Int(v), _) => q.bind(*v),
        (Value::Text(v), _) => q.bind(v.clone()),
        (Value::Bytes(v), _) => q.bind(v.clone()),
        (Value::Bool(v), _) => q.bind(*v),
        (Value::Uuid(v), _) => q.bind(v.hyphenated().to_string()),
        (Value::Time(v), _) => q.bind(timestamp_text(*v)),
        (Value::Json(v), _) => q.bind(v.to_string()),
        (Value::Null, ColumnType::Int) => q.bind(None::<i64>),
        (Value::Null, ColumnType::Bytes) => q.bind(None::<Vec<u8>>),
        (Value::Null, ColumnType::Bool) => q.bind(None::<bool>),
        (Value::Null, _) => q.bind(None::<String>),
    }
}

fn column_list(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'a> Conn<'a> {
    /// Up to `limit` rows with a key greater than `after`, in key order.
    pub async fn read_batch(
        &mut self,
        table: &Table,
        after: Option<&Value>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>, sqlx::Error> {
        let (key, key_type) = table.columns[0];
        let (mark, filter) = match self {
            Conn::Postgres(_) => ("$1", after.is_some()),
            Conn::Sqlite(_) => ("?1", after.is_some()),
        };
        let sql = format!(
            "SELECT {} FROM {} {} ORDER BY {key} LIMIT {limit}",
            column_list(table),
            table.name,
            if filter {
                format!("WHERE {key} > {mark}")
            } else {
                String::new()
            },
        );
        let mut rows = Vec::with_capacity(limit);
        match self {
            Conn::Postgres(conn) => {
                let mut q = sqlx::query(&sql);
                if let Some(after) = after {
                    q = bind_pg(q, after, key_type);
                }
                for row in q.fetch_all(&mut **conn).await? {
                    let values = table
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, (_, ty))| pg_value(&row, i, *ty))
                        .collect::<Result<_, _>>()?;
                    rows.push(values);
                }
            }
            Conn::Sqlite(conn) => {
                let mut q = sqlx::query(&sql);
                if let Some(after) = after {
                    q = bind_sqlite(q, after, key_type);
                }
                for row in q.fetch_all(&mut **conn).await? {
                    let values = table
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, (_, ty))| sqlite_value(&row, i, *ty))
                        .collect::<Result<_, _>>()?;
                    rows.push(values);
                }
            }
        }
        Ok(rows)
    }

    /// Inserts rows as they are, ids included.
    pub async fn insert_batch(
        &mut self,
        table: &Table,
        rows: &[Vec<Value>],
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let width = table.columns.len();
        let placeholders: Vec<String> = (0..rows.len())
            .map(|r| {
                let marks: Vec<String> = (1..=width)
                    .map(|c| match self {
                        Conn::Postgres(_) => format!("${}", r * width + c),
                        Conn::Sqlite(_) => format!("?{}", r * width + c),
                    })
                    .collect();
                format!("({})", marks.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES {}",
            table.name,
            column_list(table),
            placeholders.join(", ")
        );
        let values = rows.iter().flat_map(|row| row.iter().zip(table.columns));
        match self {
            Conn::Postgres(conn) => {
                let mut q = sqlx::query(&sql);
                for (value, (_, ty)) in values {
                    q = bind_pg(q, value, *ty);
                }
                q.execute(&mut **conn).await?;
            }
            Conn::Sqlite(conn) => {
                let mut q = sqlx::query(&sql);
                for (value, (_, ty)) in values {
                    q = bind_sqlite(q, value, *ty);
                }
                q.execute(&mut **conn).await?;
            }
        }
        Ok(())
    }

    /// Where a table's rows go: [`Sink`].
    pub async fn sink(self, table: &Table) -> Result<Sink<'a>, sqlx::Error> {
        Ok(match self {
            Conn::Postgres(conn) => Sink::Copy(
                conn.copy_in_raw(&format!(
                    "COPY {} ({}) FROM STDIN",
                    table.name,
                    column_list(table)
                ))
                .await?,
                Vec::new(),
            ),
            sqlite => Sink::Insert(sqlite),
        })
    }

    async fn scalar(&mut self, sql: &str) -> Result<i64, sqlx::Error> {
        match self {
            Conn::Postgres(conn) => sqlx::query_scalar(sql).fetch_one(&mut **conn).await,
            Conn::Sqlite(conn) => sqlx::query_scalar(sql).fetch_one(&mut **conn).await,
        }
    }

    async fn execute(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            Conn::Postgres(conn) => sqlx::raw_sql(sql).execute(&mut **conn).await.map(drop),
            Conn::Sqlite(conn) => sqlx::raw_sql(sql).execute(&mut **conn).await.map(drop),
        }
    }

    pub async fn count(&mut self, table: &Table) -> Result<i64, sqlx::Error> {
        self.scalar(&format!("SELECT count(*) FROM {}", table.name))
            .await
    }

    /// The highest id the table's sequence has handed out (deleted rows included), so the
    /// target never hands out an id the source already used.
    pub async fn sequence_high_water(&mut self, table: &Table) -> Result<i64, sqlx::Error> {
        let max_id = self
            .scalar(&format!(
                "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM {}",
                table.name
            ))
            .await?;
        let sequence = match self {
            Conn::Postgres(_) => {
                self.scalar(&format!(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                     FROM {}_id_seq",
                    table.name
                ))
                .await?
            }
            Conn::Sqlite(_) => {
                self.scalar(&format!(
                    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{}'), 0)",
                    table.name
                ))
                .await?
            }
        };
        Ok(max_id.max(sequence))
    }

    /// Makes the table's next id `high_water + 1`.
    pub async fn set_sequence(
        &mut self,
        table: &Table,
        high_water: i64,
    ) -> Result<(), sqlx::Error> {
        let name = table.name;
        match self {
            Conn::Postgres(_) => {
                self.execute(&format!(
                    "SELECT setval('{name}_id_seq', {}, {})",
                    high_water.max(1),
                    high_water > 0
                ))
                .await
            }
            Conn::Sqlite(_) => {
                self.execute(&format!(
                    "DELETE FROM sqlite_sequence WHERE name = '{name}';
                     INSERT INTO sqlite_sequence (name, seq) VALUES ('{name}', {high_water});"
                ))
                .await
            }
        }
    }

    /// Rows whose foreign key points at no parent.
    pub async fn orphans(
        &mut self,
        table: &Table,
        column: &str,
        parent: &str,
        parent_column: &str,
    ) -> Result<i64, sqlx::Error> {
        self.scalar(&format!(
            "SELECT count(*) FROM {} c WHERE c.{column} IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.{parent_column} = c.{column})",
            table.name
        ))
        .await
    }

    /// Empties the tables (children first) before a copy that was told to replace the target.
    pub async fn clear(&mut self, tables: &[Table]) -> Result<(), sqlx::Error> {
        for table in tables.iter().rev() {
            self.execute(&format!("DELETE FROM {}", table.name)).await?;
        }
        Ok(())
    }

    /// Brings the PostgreSQL read model up to date after a copy (SQLite's view needs nothing).
    /// Lifts the database's cutover fence: it is getting the keys.
    pub async fn lift_fence(&mut self) -> Result<(), sqlx::Error> {
        self.execute("DELETE FROM keyserver_fence").await
    }

    pub async fn refresh_views(&mut self) -> Result<(), sqlx::Error> {
        match self {
            Conn::Postgres(_) => {
                self.execute("REFRESH MATERIALIZED VIEW nchat_prekey_bundles")
                    .await
            }
            Conn::Sqlite(_) => Ok(()),
        }
    }
}

/// Where one table's rows are written on the target. PostgreSQL: one `COPY … FROM STDIN` for
/// the whole table, fed batch by batch (many times faster than INSERTs: no statement per batch,
/// no parameters); SQLite: multi-row INSERTs (it runs in process, with nothing to save).
pub enum Sink<'a> {
    /// The open COPY and a buffer for the lines of a batch.
    Copy(PgCopyIn<&'a mut PgConnection>, Vec<u8>),
    Insert(Conn<'a>),
}

impl Sink<'_> {
    pub async fn write(&mut self, table: &Table, rows: &[Vec<Value>]) -> Result<(), sqlx::Error> {
        match self {
            Sink::Copy(copy, buffer) => {
                buffer.clear();
                for row in rows {
                    copy_line(row, buffer);
                }
                copy.send(buffer.as_slice()).await?;
                Ok(())
            }
            Sink::Insert(conn) => {
                // Within SQLite's 32,766 parameters for the widest table.
                for chunk in rows.chunks(500) {
                    conn.insert_batch(table, chunk).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends the table's COPY (PostgreSQL checks every row's constraints here).
    pub async fn finish(self) -> Result<(), sqlx::Error> {
        match self {
            Sink::Copy(copy, _) => copy.finish().await.map(drop),
            Sink::Insert(_) => Ok(()),
        }
    }
}

/// Appends `row` as a line of COPY's text format: tab-separated, `\N` for NULL, backslash
/// escapes for the characters the format reserves, bytea as `\\x` and hex.
pub fn copy_line(row: &[Value], out: &mut Vec<u8>) {
    fn text(value: &str, out: &mut Vec<u8>) {
        for byte in value.bytes() {
            match byte {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                other => out.push(other),
            }
        }
    }
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match value {
            Value::Null => out.extend_from_slice(b"\\N"),
            Value::Int(v) => out.extend_from_slice(v.to_string().as_bytes()),
            Value::Text(v) => text(v, out),
            Value::Bytes(v) => {
                out.extend_from_slice(b"\\\\x");
                out.extend_from_slice(hex::encode(v).as_bytes());
            }
            Value::Bool(v) => out.push(if *v { b't' } else { b'f' }),
            Value::Uuid(v) => out.extend_from_slice(v.hyphenated().to_string().as_bytes()),
            Value::Time(v) => text(
                &v.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                out,
            ),
            Value::Json(v) => text(&v.to_string(), out),
        }
    }
    out.push(b'\n');
}

/// A digest of a table's rows that does not depend on the order they are read in (text keys
/// sort differently under PostgreSQL's collations and SQLite's), compared to the millisecond
/// for timestamps (SQLite's precision) and by value for JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checksum([u8; 32]);

impl Checksum {
    /// Adds one row (rows are unique by key, so XOR of their digests identifies the set).
    pub fn add(&mut self, row: &[Value]) {
        let mut hash = Sha256::new();
        for value in row {
            match value {
                Value::Null => hash.update([0u8]),
                Value::Int(v) => {
                    hash.update([1u8]);
                    hash.update(v.to_be_bytes());
                }
                Value::Text(v) => {
                    hash.update([2u8]);
                    hash.update((v.len() as u64).to_be_bytes());
                    hash.update(v.as_bytes());
                }
                Value::Bytes(v) => {
                    hash.update([3u8]);
                    hash.update((v.len() as u64).to_be_bytes());
                    hash.update(v);
                }
                Value::Bool(v) => hash.update([4u8, u8::from(*v)]),
                Value::Uuid(v) => {
                    hash.update([5u8]);
                    hash.update(v.as_bytes());
                }
                Value::Time(v) => {
                    hash.update([6u8]);
                    // Floor, not truncation: before 1970 the two differ, and the text form floors.
                    hash.update(v.unix_timestamp_nanos().div_euclid(1_000_000).to_be_bytes());
                }
                Value::Json(v) => {
                    let text = v.to_string();
                    hash.update([7u8]);
                    hash.update((text.len() as u64).to_be_bytes());
                    hash.update(text.as_bytes());
                }
            }
        }
        let digest: [u8; 32] = hash.finalize().into();
        for (a, b) in self.0.iter_mut().zip(digest) {
            *a ^= b;
        }
    }

    /// The first 8 bytes in hex, for the report.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(row: &[Value]) -> Checksum {
        let mut checksum = Checksum::default();
        checksum.add(row);
        checksum
    }

    #[test]
    fn copy_lines_escape_what_the_text_format_reserves() {
        let at = time::macros::datetime!(2026-12-03 20:00:00.123456 UTC);
        let mut line = Vec::new();
        copy_line(
            &[
                Value::Int(-7),
                Value::Text("tab\there\nline\r\\".into()),
                Value::Null,
                Value::Bytes(vec![0x00, 0x5c, 0xff]),
                Value::Bool(false),
                Value::Uuid(Uuid::nil()),
                Value::Time(at),
                Value::Json(serde_json::json!({"a": "b\tc"})),
            ],
            &mut line,
        );
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "-7\ttab\\there\\nline\\r\\\\\t\\N\t\\\\x005cff\tf\t\
             00000000-0000-0000-0000-000000000000\t2026-12-03T20:00:00.123456Z\t\
             {\"a\":\"b\\\\tc\"}\n"
        );
    }

    #[test]
    fn checksums_compare_values_as_both_backends_store_them() {
        // jsonb reorders keys; SQLite keeps the text as written.
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":[2,{"d":3,"c":4}]}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":[2,{"c":4,"d":3}],"b":1}"#).unwrap();
        assert_eq!(sum(&[Value::Json(a)]), sum(&[Value::Json(b)]));

        // SQLite keeps milliseconds; PostgreSQL microseconds.
        let micros = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap();
        let millis = OffsetDateTime::parse(
            &timestamp_text(micros),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(timestamp_text(micros), "2023-11-14T22:13:20.123Z");
        assert_eq!(sum(&[Value::Time(micros)]), sum(&[Value::Time(millis)]));
        // Found by the `rows` fuzz target: before 1970 too (a truncating division made the
        // millisecond of 1013-12-01T10:00:00.1123Z differ from that of its copy, .112).
        let old = OffsetDateTime::parse(
            "1013-12-01T10:00:00.1123Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let copied = OffsetDateTime::parse(
            &timestamp_text(old),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(sum(&[Value::Time(old)]), sum(&[Value::Time(copied)]));

        // Anything else that differs, differs.
        assert_ne!(sum(&[Value::Bytes(vec![1])]), sum(&[Value::Bytes(vec![2])]));
        assert_ne!(sum(&[Value::Null]), sum(&[Value::Text(String::new())]));
        assert_ne!(
            sum(&[Value::Int(1), Value::Int(2)]),
            sum(&[Value::Int(2), Value::Int(1)])
        );
        let mut two = sum(&[Value::Int(1)]);
        two.add(&[Value::Int(2)]);
        let mut other_order = sum(&[Value::Int(2)]);
        other_order.add(&[Value::Int(1)]);
        assert_eq!(two, other_order, "row order does not matter");
    }

    /// Found by the `rows` fuzz target: a SQLite source can hold a time in the year -208,
    /// whose RFC 3339 text (years 0 to 9999) the copy could not read back.
    #[test]
    fn a_time_outside_the_years_0_to_9999_is_refused_when_read() {
        let at = |year| {
            time::Date::from_calendar_date(year, time::Month::January, 1)
                .unwrap()
                .midnight()
                .assume_utc()
        };
        for year in [-9999, -208, -1] {
            let err = time_value(at(year)).unwrap_err();
            assert!(
                err.to_string().contains("outside the years 0 to 9999"),
                "{err}"
            );
        }
        for year in [0, 1970, 9999] {
            assert_eq!(time_value(at(year)).unwrap(), Value::Time(at(year)));
        }
    }

    /// Found by the `rows` fuzz target: a JSON number read from a SQLite source was parsed to
    /// a double only approximately, so the copy wrote a different number and `db verify` saw
    /// another checksum. serde_json's `float_roundtrip` parses to the nearest double.
    #[tokio::test]
    async fn a_json_number_is_copied_as_the_same_number() {
        use sqlx::Connection;
        let table = super::super::TABLES
            .iter()
            .find(|t| t.name == "nchat_e2ee_audit_log")
            .unwrap();
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let row = vec![
            Value::Int(1),
            Value::Text("master_key_created".into()),
            Value::Null,
            Value::Null,
            Value::Json(
                serde_json::from_str("55575555555555555000000000000000000001283894279063079")
                    .unwrap(),
            ),
            Value::Null,
        ];
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let create = format!("CREATE TABLE {} ({})", table.name, columns.join(", "));
        sqlx::raw_sql(&create).execute(&mut conn).await.unwrap();
        let mut db = Conn::Sqlite(&mut conn);
        db.insert_batch(table, std::slice::from_ref(&row))
            .await
            .unwrap();
        let copied = db.read_batch(table, None, 10).await.unwrap();
        assert_eq!(copied, std::slice::from_ref(&row));
        assert_eq!(sum(&copied[0]), sum(&row));
    }
}
