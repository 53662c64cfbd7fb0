//! One statement for both backends, and values that mean the same on both.
//!
//! The store's rules run against PostgreSQL and SQLite alike, so they are written once over
//! this layer: a statement is an [`Sql`] pair, written once with [`sql!`] where the dialects
//! agree (both take `$1`-style parameters, `TRUE`/`FALSE` and `RETURNING`) and with a marked
//! fragment where they do not (`NOW`, list membership, row locks). A [`Query`] binds values
//! once; the value types here ([`Uid`], [`At`], [`Json`], [`List`]) encode as each backend stores
//! them (a UUID is `UUID` on PostgreSQL and hyphenated text on SQLite, a time `TIMESTAMPTZ` or
//! RFC 3339 text), and rows decode into `FromRow` structs shared by both.

use keyserver_proto::wire::{KyberPublicKey, PublicKey};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Encode, Execute, FromRow, PgConnection, Postgres, Sqlite, SqliteConnection, Type};
use time::OffsetDateTime;
use uuid::Uuid;

/// Which backend a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// "postgres" or "sqlite", for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// A statement in PostgreSQL's and SQLite's dialects. An empty text is a statement the backend
/// does not need (a lock SQLite's single writer already holds): running it does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sql {
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

/// Writes an [`Sql`] once from string literals and these dialect fragments:
/// - `NOW`: the current time as the schema stores it;
/// - `IN_LIST("$2")`: membership in a [`List`] parameter (`= ANY($2)` / `json_each`);
/// - `PG("…")` / `SQLITE("…")`: text only one backend gets (row locks, collations, casts).
macro_rules! sql {
    (@go [$($pg:expr),*] [$($lite:expr),*]) => {
        $crate::store::sql::Sql { postgres: concat!($($pg),*), sqlite: concat!($($lite),*) }
    };
    (@go [$($pg:expr),*] [$($lite:expr),*] NOW $($rest:tt)*) => {
        sql!(@go [$($pg,)* "NOW()"] [$($lite,)* "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"] $($rest)*)
    };
    (@go [$($pg:expr),*] [$($lite:expr),*] IN_LIST($p:literal) $($rest:tt)*) => {
        sql!(@go [$($pg,)* " = ANY(", $p, ")"]
                 [$($lite,)* " IN (SELECT value FROM json_each(", $p, "))"] $($rest)*)
    };
    (@go [$($pg:expr),*] [$($lite:expr),*] PG($text:literal) $($rest:tt)*) => {
        sql!(@go [$($pg,)* $text] [$($lite),*] $($rest)*)
    };
    (@go [$($pg:expr),*] [$($lite:expr),*] SQLITE($text:literal) $($rest:tt)*) => {
        sql!(@go [$($pg),*] [$($lite,)* $text] $($rest)*)
    };
    (@go [$($pg:expr),*] [$($lite:expr),*] $text:literal $($rest:tt)*) => {
        sql!(@go [$($pg,)* $text] [$($lite,)* $text] $($rest)*)
    };
    ($($t:tt)*) => { sql!(@go [] [] $($t)*) };
}
pub(crate) use sql;

/// A statement with its parameters, bound once for whichever backend runs it; `'q` is as long
/// as the connection and the borrowed parameters live.
pub enum Query<'q> {
    Postgres(
        &'q mut PgConnection,
        sqlx::query::Query<'q, Postgres, PgArguments>,
    ),
    Sqlite(
        &'q mut SqliteConnection,
        sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    ),
}

/// A value both backends can bind.
pub trait Bind<'q>:
    'q + Send + Encode<'q, Postgres> + Type<Postgres> + Encode<'q, Sqlite> + Type<Sqlite>
{
}

impl<'q, T> Bind<'q> for T where
    T: 'q + Send + Encode<'q, Postgres> + Type<Postgres> + Encode<'q, Sqlite> + Type<Sqlite>
{
}

/// A row both backends can decode.
pub trait Decoded:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<T> Decoded for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<'q> Query<'q> {
    pub fn bind<T: Bind<'q>>(self, value: T) -> Self {
        match self {
            Self::Postgres(c, q) => Self::Postgres(c, q.bind(value)),
            Self::Sqlite(c, q) => Self::Sqlite(c, q.bind(value)),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Postgres(_, q) => q.sql().is_empty(),
            Self::Sqlite(_, q) => q.sql().is_empty(),
        }
    }

    /// Runs the statement; the number of rows it changed.
    pub async fn execute(self) -> Result<u64, sqlx::Error> {
        if self.is_empty() {
            return Ok(0);
        }
        Ok(match self {
            Self::Postgres(c, q) => q.execute(c).await?.rows_affected(),
            Self::Sqlite(c, q) => q.execute(c).await?.rows_affected(),
        })
    }

    pub async fn fetch_all<R: Decoded>(self) -> Result<Vec<R>, sqlx::Error> {
        match self {
            Self::Postgres(c, q) => q.fetch_all(c).await?.iter().map(R::from_row).collect(),
            Self::Sqlite(c, q) => q.fetch_all(c).await?.iter().map(R::from_row).collect(),
        }
    }

    pub async fn fetch_optional<R: Decoded>(self) -> Result<Option<R>, sqlx::Error> {
        match self {
            Self::Postgres(c, q) => q.fetch_optional(c).await?.as_ref().map(R::from_row),
            Self::Sqlite(c, q) => q.fetch_optional(c).await?.as_ref().map(R::from_row),
        }
        .transpose()
    }

    pub async fn fetch_one<R: Decoded>(self) -> Result<R, sqlx::Error> {
        self.fetch_optional().await?.ok_or(sqlx::Error::RowNotFound)
    }

    /// The first column of the one row the statement returns.
    pub async fn scalar<T>(self) -> Result<T, sqlx::Error>
    where
        (T,): Decoded,
    {
        Ok(self.fetch_one::<(T,)>().await?.0)
    }
}

/// Implements `Type`, `Encode` and `Decode` for both backends by way of other types: per
/// backend, the type a value is encoded as (and its conversion) and the type it is decoded from.
macro_rules! dual_type {
    ($ty:ty,
     postgres: $pg:ty, $to_pg:expr, $pg_dec:ty, $from_pg:expr,
     sqlite: $lite:ty, $to_lite:expr, $lite_dec:ty, $from_lite:expr) => {
        impl ::sqlx::Type<::sqlx::Postgres> for $ty {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <$pg as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <$pg_dec as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }
        impl ::sqlx::Type<::sqlx::Sqlite> for $ty {
            fn type_info() -> ::sqlx::sqlite::SqliteTypeInfo {
                <$lite as ::sqlx::Type<::sqlx::Sqlite>>::type_info()
            }
            fn compatible(ty: &::sqlx::sqlite::SqliteTypeInfo) -> bool {
                <$lite_dec as ::sqlx::Type<::sqlx::Sqlite>>::compatible(ty)
            }
        }
        impl<'q> ::sqlx::Encode<'q, ::sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                let value: $pg = ($to_pg)(self);
                <$pg as ::sqlx::Encode<'q, ::sqlx::Postgres>>::encode(value, buf)
            }
        }
        impl<'q> ::sqlx::Encode<'q, ::sqlx::Sqlite> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut Vec<::sqlx::sqlite::SqliteArgumentValue<'q>>,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                let value: $lite = ($to_lite)(self);
                <$lite as ::sqlx::Encode<'q, ::sqlx::Sqlite>>::encode(value, buf)
            }
        }
        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $ty {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                ($from_pg)(<$pg_dec as ::sqlx::Decode<'r, ::sqlx::Postgres>>::decode(
                    value,
                )?)
            }
        }
        impl<'r> ::sqlx::Decode<'r, ::sqlx::Sqlite> for $ty {
            fn decode(
                value: ::sqlx::sqlite::SqliteValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                ($from_lite)(<$lite_dec as ::sqlx::Decode<'r, ::sqlx::Sqlite>>::decode(
                    value,
                )?)
            }
        }
    };
}
pub(crate) use dual_type;

/// A user id: `UUID` on PostgreSQL, hyphenated text on SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(pub Uuid);

dual_type!(Uid,
    postgres: Uuid, |v: &Uid| v.0, Uuid, |v| Ok(Uid(v)),
    sqlite: String, |v: &Uid| v.0.hyphenated().to_string(),
        &str, |v: &str| Ok(Uid(Uuid::parse_str(v)?)));

/// A point in time: `TIMESTAMPTZ` on PostgreSQL; on SQLite the text `NOW` writes (UTC,
/// RFC 3339, milliseconds), so stored times compare and sort as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct At(pub OffsetDateTime);

dual_type!(At,
    postgres: OffsetDateTime, |v: &At| v.0, OffsetDateTime, |v| Ok(At(v)),
    sqlite: String, |v: &At| timestamp_text(v.0), OffsetDateTime, |v| Ok(At(v)));

/// A JSON document: `JSONB` on PostgreSQL, text on SQLite.
#[derive(Debug, Clone, PartialEq)]
pub struct Json(pub serde_json::Value);

dual_type!(Json,
    postgres: serde_json::Value, |v: &Json| v.0.clone(), serde_json::Value, |v| Ok(Json(v)),
    sqlite: String, |v: &Json| v.0.to_string(),
        &str, |v: &str| Ok(Json(serde_json::from_str(v)?)));

/// A list parameter for `IN_LIST`: an array on PostgreSQL, a JSON array on SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

macro_rules! list_type {
    ($item:ty) => {
        dual_type!(List<$item>,
            postgres: Vec<$item>, |v: &List<$item>| v.0.clone(), Vec<$item>, |v| Ok(List(v)),
            sqlite: String, |v: &List<$item>| serde_json::to_string(&v.0).expect("lists serialize"),
                &str, |v: &str| Ok(List(serde_json::from_str(v)?)));
    };
}
list_type!(i32);
list_type!(String);
list_type!(Uuid);

/// A stored Curve25519 public key: the 32 raw bytes the schema keeps (the wire adds the type
/// byte); any other length is a corrupt row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(pub PublicKey);

dual_type!(Key,
    postgres: Vec<u8>, |v: &Key| v.0.as_raw().to_vec(), &[u8], |v: &[u8]| Ok(Key(PublicKey::from_raw_slice(v)?)),
    sqlite: Vec<u8>, |v: &Key| v.0.as_raw().to_vec(), &[u8], |v: &[u8]| Ok(Key(PublicKey::from_raw_slice(v)?)));

/// A stored Kyber1024 public key: the 1568 raw bytes (the wire adds the type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KyberKey(pub KyberPublicKey);

dual_type!(KyberKey,
    postgres: Vec<u8>, |v: &KyberKey| v.0.as_raw().to_vec(), &[u8],
        |v: &[u8]| Ok(KyberKey(KyberPublicKey::from_raw_slice(v)?)),
    sqlite: Vec<u8>, |v: &KyberKey| v.0.as_raw().to_vec(), &[u8],
        |v: &[u8]| Ok(KyberKey(KyberPublicKey::from_raw_slice(v)?)));

/// A stored signature: exactly 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

fn stored_signature(bytes: &[u8]) -> Result<Sig, BoxDynError> {
    Ok(Sig(bytes.try_into().map_err(|_| {
        format!("stored signature has {} bytes", bytes.len())
    })?))
}

dual_type!(Sig,
    postgres: Vec<u8>, |v: &Sig| v.0.to_vec(), &[u8], stored_signature,
    sqlite: Vec<u8>, |v: &Sig| v.0.to_vec(), &[u8], stored_signature);

/// A time as this schema stores it in SQLite, exactly as `NOW` writes it.
pub fn timestamp_text(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_written_once_with_dialect_fragments() {
        const S: Sql = sql!("UPDATE t SET at = " NOW " WHERE id" IN_LIST("$1") PG(" FOR UPDATE") SQLITE(" -- lite"));
        assert_eq!(
            S.postgres,
            "UPDATE t SET at = NOW() WHERE id = ANY($1) FOR UPDATE"
        );
        assert_eq!(
            S.sqlite,
            "UPDATE t SET at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id IN \
             (SELECT value FROM json_each($1)) -- lite"
        );
    }
}
