//! Rollout status as git notes: the note format (pure) and the writer task.

pub mod format;
pub mod status;
pub mod writer;

use crate::cli::{StatusArgs, StatusFormat};
use crate::gitsrc::notes::{Author, NotesError, NotesStore};

/// `opamp-gitops status`: reads history and notes, renders them.
pub fn status_command(args: &StatusArgs) -> Result<String, NotesError> {
    let store = NotesStore::new(&args.repo, args.fetch.clone(), Author::default());
    store.fetch(&git2::RemoteCallbacks::new)?;
    let rows = status::collect(store.history(&args.rev, args.limit)?);
    Ok(match args.format {
        StatusFormat::Json => status::render_json(&rows) + "\n",
        StatusFormat::Text => status::render_text(&rows),
    })
}
