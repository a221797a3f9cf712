//! One connection to PostgreSQL, with the notifications it receives on a
//! channel, and the start-up migration.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// The schema, applied by every replica at start (idempotent).
const SCHEMA: &str = include_str!("schema.sql");
/// How long a connection may go unanswered before it counts as broken.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// Serialises the migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x6f70_616d_7067;

/// How long a replica waits between attempts to reach PostgreSQL: short
/// enough that a restarted database is found again within seconds.
pub const RECONNECT: Backoff = Backoff {
    min: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

/// Where PostgreSQL is, and the TLS a connection speaks when the URL's
/// `sslmode` asks for it (`prefer`, the default, or `require`): the
/// server's certificate is checked against `--store-ca`, or the system's.
#[derive(Clone)]
pub struct Database {
    url: String,
    tls: MakeRustlsConnect,
}

impl Database {
    pub fn new(url: String, tls: rustls::ClientConfig) -> Self {
        Database {
            url,
            tls: MakeRustlsConnect::new(tls),
        }
    }
}

impl std::fmt::Debug for Database {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Database")
    }
}

/// A connection and the notifications it has received. When the connection
/// breaks, `notifications` ends and every query fails: drop it and connect again.
pub struct Db {
    pub client: Client,
    pub notifications: mpsc::UnboundedReceiver<Notification>,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("this replica no longer holds the leader lease")]
    Fenced,
    #[error("PostgreSQL cannot be reached")]
    Unreachable,
    #[error("a stored value is unreadable: {0}")]
    Decode(#[from] serde_json::Error),
}

impl Db {
    /// Connects. A database that stops answering is noticed within seconds
    /// (connect timeout, TCP keepalives and user timeout), so no task waits
    /// on a dead connection for long.
    pub async fn connect(database: &Database) -> Result<Db, DbError> {
        let mut config: tokio_postgres::Config = database.url.parse()?;
        config
            .connect_timeout(DEAD_AFTER)
            .tcp_user_timeout(DEAD_AFTER)
            .keepalives(true)
            .keepalives_idle(DEAD_AFTER / 2)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        let (client, mut connection) = config.connect(database.tls.clone()).await?;
        let (tx, notifications) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the PostgreSQL connection broke");
                        break;
                    }
                }
            }
        });
        Ok(Db { client, notifications })
    }

    /// Connects, after waiting `retry` (zero the first time), retrying with
    /// backoff until it works or `cancel` fires. `retry` grows with every
    /// failure, a failure of the connection made here included: the caller
    /// resets it once the connection has done its work.
    pub async fn connect_until(
        database: &Database,
        what: &str,
        retry: &mut Duration,
        cancel: &CancellationToken,
    ) -> Option<Db> {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(*retry) => {}
            }
            *retry = RECONNECT.next((*retry).max(RECONNECT.min / 2));
            match Db::connect(database).await {
                Ok(db) => return Some(db),
                Err(e) => tracing::warn!(error = %e, task = what, retry_in = ?*retry, "cannot reach PostgreSQL"),
            }
        }
    }

    /// Creates the tables when they are missing.
    pub async fn migrate(&mut self) -> Result<(), DbError> {
        let tx = self.client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether the connection has broken.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
