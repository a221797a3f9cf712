//! `GET /api/v1/history` and `GET /api/v1/history/{commit}`: recent commits
//! of the tracked branch with their notes, read through the notes store (the
//! same rows as `status --format json`).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{ApiState, error};
use crate::gitsrc::notes::{Author, NotesError};
use crate::notes::status::{self, CommitStatus};

/// Commits listed when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 20;
/// The most commits one answer lists.
pub const MAX_LIMIT: usize = 200;

#[derive(Debug, Default, Deserialize)]
pub struct HistoryParams {
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct HistoryJson {
    /// Newest first, first parents only, from the branch's newest commit.
    commits: Vec<CommitStatus>,
}

#[derive(Debug, Serialize)]
struct CommitJson {
    #[serde(flatten)]
    commit: CommitStatus,
    /// The note as stored, when there is one.
    note_text: Option<String>,
}

/// A commit id as the path names it: 4 to 40 hex digits (git revision
/// syntax is not accepted).
pub fn commit_id(text: &str) -> Option<&str> {
    (4..=40)
        .contains(&text.len())
        .then_some(text)
        .filter(|t| t.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "no repository is configured (serve --repo)",
    )
}

fn failed(e: &NotesError) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &format!("reading the notes: {e}"))
}

/// `GET /api/v1/history[?limit=20]`.
pub async fn list(State(state): State<ApiState>, query: Result<Query<HistoryParams>, QueryRejection>) -> Response {
    let limit = match query {
        Ok(Query(p)) => p.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let Some(git) = &state.git else { return unavailable() };
    let status = git.status().borrow().clone();
    let Some(tip) = status.head.or(status.loaded) else {
        return Json(HistoryJson { commits: vec![] }).into_response();
    };
    let store = git.notes_store(Author::default());
    let read = tokio::task::spawn_blocking(move || store.history(tip.as_str(), limit)).await;
    match read {
        Ok(Ok(history)) => Json(HistoryJson {
            commits: status::collect(history),
        })
        .into_response(),
        Ok(Err(e)) => failed(&e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reading the notes failed"),
    }
}

/// `GET /api/v1/history/{commit}`: one commit with its note, parsed and as stored.
pub async fn one(State(state): State<ApiState>, Path(commit): Path<String>) -> Response {
    let Some(commit) = commit_id(&commit).map(str::to_string) else {
        return error(StatusCode::BAD_REQUEST, "not a commit id (4 to 40 hex digits)");
    };
    let Some(git) = &state.git else { return unavailable() };
    let store = git.notes_store(Author::default());
    let read = tokio::task::spawn_blocking(move || store.history(&commit, 1)).await;
    match read {
        Ok(Ok(mut history)) if !history.is_empty() => {
            let (info, text) = history.remove(0);
            let mut rows = status::collect(vec![(info, text.clone())]);
            Json(CommitJson {
                commit: rows.remove(0),
                note_text: text,
            })
            .into_response()
        }
        Ok(Ok(_)) => error(StatusCode::NOT_FOUND, "no such commit"),
        Ok(Err(NotesError::Git { source, .. })) if source.code() == git2::ErrorCode::NotFound => {
            error(StatusCode::NOT_FOUND, "no such commit")
        }
        Ok(Err(e)) => failed(&e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reading the notes failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_are_hex_and_nothing_else() {
        assert_eq!(commit_id("abc1"), Some("abc1"));
        assert_eq!(commit_id(&"f".repeat(40)), Some(&*"f".repeat(40)));
        assert_eq!(commit_id("abc"), None, "too short");
        assert_eq!(commit_id(&"f".repeat(41)), None, "too long");
        assert_eq!(commit_id("HEAD~1"), None);
        assert_eq!(commit_id("main"), None);
    }
}
