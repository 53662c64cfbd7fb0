//! Buckets in Redis, shared by every server process that names the same Redis: one atomic
//! Lua script per check (`take.lua`), as Signal-Server keeps its rate limiters. Each bucket
//! expires when it is full again, so Redis holds only the buckets in use.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::Charge;

pub struct RedisBuckets {
    connection: ConnectionManager,
    script: redis::Script,
}

impl RedisBuckets {
    /// Buckets in the Redis at `url`, connected lazily (a server starts while Redis is down;
    /// calls meanwhile follow the failure mode). Each command gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("--redis-url is not a Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Self {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            script: redis::Script::new(include_str!("take.lua")),
        })
    }

    /// Charges every bucket or none: Ok(None) when charged, Ok(Some((ms, i))) with the wait and
    /// the charge that waits longest when refused, Err when Redis did not answer.
    pub async fn take(
        &self,
        charges: &[Charge],
        now: i64,
    ) -> Result<Option<(i64, usize)>, redis::RedisError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(now);
        for c in charges {
            invocation
                .key(&c.key)
                .arg(c.rule.interval_ms())
                .arg(c.rule.capacity)
                .arg(c.cost);
        }
        let mut connection = self.connection.clone();
        let (wait, worst): (i64, usize) = invocation.invoke_async(&mut connection).await?;
        Ok((wait > 0).then(|| (wait, worst.saturating_sub(1))))
    }
}
