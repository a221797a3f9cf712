//! What the benchmarks that run `opamp-gitops` share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub type Error = Box<dyn std::error::Error>;

/// `target/release/examples/NAME` → `target/release/opamp-gitops`.
pub fn sibling_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let bin = dir.join("opamp-gitops");
    if !bin.is_file() {
        return Err(format!("{} not found; build it (cargo build --release)", bin.display()).into());
    }
    Ok(bin)
}

/// User plus system CPU time, in seconds, from the text of `/proc/PID/stat`.
pub fn cpu_seconds(stat: &str) -> Result<f64, Error> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks = |i: usize| -> Result<f64, Error> { Ok(fields.get(i).ok_or("short /proc/PID/stat")?.parse::<f64>()?) };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// Ticks per second of `/proc` times, asked of `getconf` once.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
