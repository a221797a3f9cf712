//! Commit statuses in the forge that hosts the repository: which status a
//! notice sets (pending while a group rolls out, success when complete,
//! failure when halted or invalid) and the GitHub or GitLab API request that
//! sets it. Pure.

use serde::Serialize;

use super::notice::{Kind, Notice};
use super::payload::{Request, summary, truncate};

/// GitHub refuses a longer description.
pub const MAX_DESCRIPTION: usize = 140;

/// The context (GitLab: the name) of a group's status is this, `/`, the
/// group; an invalid commit's is this alone.
pub const CONTEXT: &str = "opamp-gitops";

/// The environment variables that hold the forges' tokens.
pub const GITHUB_TOKEN_ENV: &str = "OPAMP_GITOPS_GITHUB_TOKEN";
pub const GITLAB_TOKEN_ENV: &str = "OPAMP_GITOPS_GITLAB_TOKEN";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    GitLab,
}

impl ForgeKind {
    /// The public service's API.
    pub fn default_api(self) -> &'static str {
        match self {
            ForgeKind::GitHub => "https://api.github.com",
            ForgeKind::GitLab => "https://gitlab.com/api/v4",
        }
    }

    /// Where its token is read from.
    pub fn token_env(self) -> &'static str {
        match self {
            ForgeKind::GitHub => GITHUB_TOKEN_ENV,
            ForgeKind::GitLab => GITLAB_TOKEN_ENV,
        }
    }
}

/// The repository's project in a forge: `github:owner/repo`, or
/// `gitlab:<id>` / `gitlab:group/project` (the path is URL-encoded here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeProject {
    pub kind: ForgeKind,
    /// `owner/repo` for GitHub; the id or the URL-encoded path for GitLab.
    pub project: String,
}

impl ForgeProject {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let usage = "expected github:OWNER/REPO or gitlab:PROJECT (its id, or its path such as group/project)";
        let (kind, rest) = match spec.split_once(':') {
            Some(("github", rest)) => (ForgeKind::GitHub, rest),
            Some(("gitlab", rest)) => (ForgeKind::GitLab, rest),
            _ => return Err(usage.to_string()),
        };
        let safe = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && s != "."
                && s != ".."
        };
        let project = match kind {
            ForgeKind::GitHub => match rest.split_once('/') {
                Some((owner, repo)) if safe(owner) && safe(repo) => rest.to_string(),
                _ => return Err(format!("{spec:?}: {usage}")),
            },
            ForgeKind::GitLab => {
                let path = rest.replace("%2F", "/").replace("%2f", "/");
                if !path.split('/').all(safe) {
                    return Err(format!("{spec:?}: {usage}"));
                }
                path.replace('/', "%2F")
            }
        };
        Ok(ForgeProject { kind, project })
    }
}

/// Everything needed to set statuses.
#[derive(Clone, PartialEq, Eq)]
pub struct Forge {
    pub project: ForgeProject,
    /// The API's base URL, without a trailing slash.
    pub api: String,
    pub token: String,
}

/// Never shows the token.
impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge")
            .field("project", &self.project)
            .field("api", &self.api)
            .field("token", &"***")
            .finish()
    }
}

/// A commit status, as both forges have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A rollout in progress.
    Pending,
    Success,
    /// Halted, rolled back, or an invalid commit.
    Failure,
    /// Replaced by a newer commit before it completed.
    Superseded,
}

impl State {
    pub fn of(kind: Kind) -> State {
        match kind {
            Kind::RolloutStarted | Kind::WaveOpened | Kind::AgentsFailed => State::Pending,
            Kind::RolloutComplete => State::Success,
            Kind::RolloutHalted | Kind::RolledBack | Kind::CommitInvalid => State::Failure,
            Kind::RolloutSuperseded => State::Superseded,
        }
    }

    /// The value of `state` in the forge's API.
    pub fn name(self, forge: ForgeKind) -> &'static str {
        match (self, forge) {
            (State::Pending, ForgeKind::GitHub) => "pending",
            // GitLab's pending means queued; its rollout runs.
            (State::Pending, ForgeKind::GitLab) => "running",
            (State::Success, _) => "success",
            (State::Failure, ForgeKind::GitHub) => "failure",
            (State::Failure, ForgeKind::GitLab) => "failed",
            (State::Superseded, ForgeKind::GitHub) => "error",
            (State::Superseded, ForgeKind::GitLab) => "canceled",
        }
    }
}

/// The status's context: `opamp-gitops/<group>`, or `opamp-gitops` for a
/// notice about the whole commit.
pub fn context(n: &Notice) -> String {
    match &n.group {
        Some(group) => format!("{CONTEXT}/{group}"),
        None => CONTEXT.to_string(),
    }
}

#[derive(Serialize)]
struct GitHubStatus<'a> {
    state: &'a str,
    target_url: &'a str,
    description: &'a str,
    context: &'a str,
}

#[derive(Serialize)]
struct GitLabStatus<'a> {
    state: &'a str,
    name: &'a str,
    target_url: &'a str,
    description: &'a str,
}

impl Forge {
    /// The request that sets the status `n` calls for; `None` for a notice
    /// without a commit.
    pub fn request(&self, n: &Notice, link: &str) -> Option<Request> {
        let commit = n.commit.as_ref()?;
        let kind = self.project.kind;
        let state = State::of(n.event).name(kind);
        let description = truncate(summary(n), MAX_DESCRIPTION);
        let context = context(n);
        let (url, headers, body) = match kind {
            ForgeKind::GitHub => (
                format!("{}/repos/{}/statuses/{commit}", self.api, self.project.project),
                vec![
                    ("authorization", format!("Bearer {}", self.token)),
                    ("accept", "application/vnd.github+json".to_string()),
                    ("x-github-api-version", "2022-11-28".to_string()),
                ],
                serde_json::to_vec(&GitHubStatus {
                    state,
                    target_url: link,
                    description: &description,
                    context: &context,
                }),
            ),
            ForgeKind::GitLab => (
                format!("{}/projects/{}/statuses/{commit}", self.api, self.project.project),
                vec![("private-token", self.token.clone())],
                serde_json::to_vec(&GitLabStatus {
                    state,
                    name: &context,
                    target_url: link,
                    description: &description,
                }),
            ),
        };
        Some(Request {
            url,
            headers,
            body: body.expect("a status always serializes"),
        })
    }

    /// Whether an answer that is no success means the status is already
    /// set: GitLab refuses to set a status to the state it has (`400 Cannot
    /// transition status via :run from :running`).
    pub fn already_set(&self, status: u16, body: &[u8]) -> bool {
        self.project.kind == ForgeKind::GitLab
            && status == 400
            && String::from_utf8_lossy(body).contains("Cannot transition status")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CommitId;
    use crate::notify::payload::tests::halted;

    fn forge(spec: &str) -> Forge {
        let project = ForgeProject::parse(spec).unwrap();
        Forge {
            api: project.kind.default_api().to_string(),
            project,
            token: "t0ken".into(),
        }
    }

    #[test]
    fn projects() {
        assert_eq!(
            ForgeProject::parse("github:acme/fleet-config"),
            Ok(ForgeProject {
                kind: ForgeKind::GitHub,
                project: "acme/fleet-config".into()
            })
        );
        assert_eq!(ForgeProject::parse("gitlab:1234").unwrap().project, "1234");
        for path in ["gitlab:ops/otel/fleet", "gitlab:ops%2Fotel%2Ffleet"] {
            assert_eq!(
                ForgeProject::parse(path).unwrap().project,
                "ops%2Fotel%2Ffleet",
                "{path}"
            );
        }
        for bad in [
            "github:acme",
            "github:acme/fleet/x",
            "github:../x",
            "gitea:a/b",
            "acme/fleet",
            "gitlab:",
            "gitlab:a//b",
            "github:a/b?c",
        ] {
            assert!(ForgeProject::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn github_statuses() {
        let n = halted();
        let r = forge("github:acme/fleet")
            .request(&n, "http://ctl/api/v1/groups")
            .unwrap();
        assert_eq!(
            r.url,
            format!(
                "https://api.github.com/repos/acme/fleet/statuses/{}",
                n.commit.clone().unwrap()
            )
        );
        assert_eq!(
            r.headers,
            [
                ("authorization", "Bearer t0ken".to_string()),
                ("accept", "application/vnd.github+json".to_string()),
                ("x-github-api-version", "2022-11-28".to_string()),
            ]
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "state": "failure",
                "target_url": "http://ctl/api/v1/groups",
                "description": "halted at wave 1 of 4: 1 agent failed; 0 of 5 agents applied",
                "context": "opamp-gitops/edge",
            })
        );
    }

    #[test]
    fn gitlab_statuses() {
        let n = Notice {
            event: Kind::WaveOpened,
            ..halted()
        };
        let r = forge("gitlab:ops/fleet")
            .request(&n, "http://ctl/api/v1/groups")
            .unwrap();
        assert!(
            r.url
                .starts_with("https://gitlab.com/api/v4/projects/ops%2Ffleet/statuses/4f1c0d")
        );
        assert_eq!(r.headers, [("private-token", "t0ken".to_string())]);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["state"], "running");
        assert_eq!(body["name"], "opamp-gitops/edge");
        assert_eq!(body.as_object().unwrap().len(), 4);
        let f = forge("gitlab:1");
        assert!(f.already_set(400, br#"{"message":"Cannot transition status via :run from :running"}"#));
        assert!(!f.already_set(400, br#"{"message":"state is invalid"}"#));
        assert!(!forge("github:a/b").already_set(400, b"Cannot transition status"));
    }

    #[test]
    fn states_and_descriptions() {
        let cases = [
            (Kind::RolloutStarted, "pending", "running"),
            (Kind::WaveOpened, "pending", "running"),
            (Kind::AgentsFailed, "pending", "running"),
            (Kind::RolloutHalted, "failure", "failed"),
            (Kind::RolledBack, "failure", "failed"),
            (Kind::RolloutComplete, "success", "success"),
            (Kind::RolloutSuperseded, "error", "canceled"),
            (Kind::CommitInvalid, "failure", "failed"),
        ];
        for (kind, github, gitlab) in cases {
            assert_eq!(State::of(kind).name(ForgeKind::GitHub), github, "{kind:?}");
            assert_eq!(State::of(kind).name(ForgeKind::GitLab), gitlab, "{kind:?}");
        }
        let invalid = crate::notify::notice::invalid(
            &CommitId::new("ab".repeat(20)),
            &["groups/edge.yaml:3:7: a very long message ".repeat(10)],
            None,
            std::time::SystemTime::UNIX_EPOCH,
        );
        let r = forge("github:a/b").request(&invalid, "http://ctl").unwrap();
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["context"], "opamp-gitops");
        let description = body["description"].as_str().unwrap();
        assert_eq!(description.chars().count(), MAX_DESCRIPTION);
        assert!(description.starts_with("invalid, nothing rolled out: 1 problem; groups/edge.yaml:3:7"));
        let no_commit = Notice {
            commit: None,
            ..halted()
        };
        assert_eq!(forge("github:a/b").request(&no_commit, "http://ctl"), None);
    }
}
