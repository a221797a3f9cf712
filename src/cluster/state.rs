//! The rollout state in `opamp_rollout_state`, fenced by the leader's epoch:
//! a new leader claims the row as it loads it, and a save names the epoch it
//! was made in, so a leader that lost its lease can save nothing.

use tokio_postgres::types::Json;

use super::db::{Database, Db, DbError};
use super::lease::Fence;
use crate::reconcile::RolloutState;

const CLAIM: &str = "UPDATE opamp_rollout_state SET epoch = $1
     WHERE id = 1 AND epoch <= $1
       AND EXISTS (SELECT 1 FROM opamp_leader WHERE id = 1 AND holder = $2 AND epoch = $1 AND expires_at > now())
     RETURNING state";
const SAVE: &str = "UPDATE opamp_rollout_state SET state = $3
     WHERE id = 1 AND epoch = $1
       AND EXISTS (SELECT 1 FROM opamp_leader WHERE id = 1 AND holder = $2 AND epoch = $1 AND expires_at > now())";

/// The leader's access to the rollout state; connects when first used and
/// again after the connection breaks.
pub struct StateStore {
    database: Database,
    replica: String,
    db: Option<Db>,
}

impl StateStore {
    pub fn new(database: Database, replica: String) -> Self {
        StateStore {
            database,
            replica,
            db: None,
        }
    }

    /// Claims the state for `fence`'s epoch and answers it; `None` when none
    /// was saved yet.
    pub async fn claim(&mut self, fence: Fence) -> Result<Option<RolloutState>, DbError> {
        let replica = self.replica.clone();
        let db = self.db().await?;
        let row = db.client.query_opt(CLAIM, &[&fence.epoch, &replica]).await;
        let row = self.check(row)?.ok_or(DbError::Fenced)?;
        Ok(row
            .try_get::<_, Option<Json<RolloutState>>>(0)?
            .map(|Json(state)| state))
    }

    /// Replaces the state, unless another leader has claimed it since.
    pub async fn save(&mut self, fence: Fence, state: &RolloutState) -> Result<(), DbError> {
        if !fence.holds() {
            return Err(DbError::Fenced);
        }
        let replica = self.replica.clone();
        let db = self.db().await?;
        let saved = db.client.execute(SAVE, &[&fence.epoch, &replica, &Json(state)]).await;
        match self.check(saved)? {
            0 => Err(DbError::Fenced),
            _ => Ok(()),
        }
    }

    async fn db(&mut self) -> Result<&Db, DbError> {
        if self.db.as_ref().is_none_or(Db::is_closed) {
            self.db = Some(Db::connect(&self.database).await?);
        }
        Ok(self.db.as_ref().expect("connected above"))
    }

    /// Drops a connection that failed, so the next call connects again.
    fn check<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> Result<T, DbError> {
        r.map_err(|e| {
            self.db = None;
            e.into()
        })
    }
}
