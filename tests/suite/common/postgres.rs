//! A real PostgreSQL for tests: a cluster of its own made with `initdb` in
//! a temp dir and run with `pg_ctl` on a free port of 127.0.0.1 (Debian's
//! `postgresql` package; `scripts/install-packages` installs it). As root,
//! the server runs as the `postgres` user, which PostgreSQL requires.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::free_addr;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The server's certificate and key (PEM), when it speaks TLS.
    tls: Option<(PathBuf, PathBuf)>,
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A server that also speaks TLS, with a certificate `ca` issued for
    /// `localhost` and 127.0.0.1.
    pub fn start_tls(ca: &super::certs::Ca) -> Postgres {
        Postgres::start_with(Some(ca))
    }

    fn start_with(ca: Option<&super::certs::Ca>) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            chown_postgres(dir.path());
        }
        let tls = ca.map(|ca| {
            let (cert, key) = ca.issue("localhost");
            let (cert_file, key_file) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).expect("write the certificate");
            std::fs::write(&key_file, key).expect("write the key");
            std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            if is_root() {
                chown_postgres(&cert_file);
                chown_postgres(&key_file);
            }
            (cert_file, key_file)
        });
        let pg = Postgres {
            bin,
            port: free_addr().port(),
            dir,
            tls,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        );
        pg.up();
        pg
    }

    /// `postgres://` URL of the server's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server again (after [`Postgres::stop`]) on the same port and data.
    pub fn up(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        if let Some((cert, key)) = &self.tls {
            options += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-o", &options, "-l", &log, "-w", "start"],
        );
    }

    /// Stops the server at once (connections are cut, as in a crash).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    /// Runs SQL with `psql`; its output, unaligned and without headers.
    pub fn sql(&self, query: &str) -> String {
        // Without TLS: counts of encrypted connections are the others'.
        let out = Command::new(self.bin.join("psql"))
            .env("PGSSLMODE", "disable")
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-c",
                query,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command.args(args).output().expect("the PostgreSQL tool runs");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.stop());
    }
}

/// Where Debian keeps the server's programs (the newest version installed).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/install-packages)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn chown_postgres(dir: &Path) {
    let out = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(dir)
        .output()
        .expect("chown runs");
    assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
}
