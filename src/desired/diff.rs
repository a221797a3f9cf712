//! Unified diffs of config bodies, for `plan` and the API. Pure.

/// A unified diff with three lines of context; bodies that are not UTF-8 are
/// only said to differ.
pub fn unified_diff(old: &[u8], new: &[u8], old_label: &str, new_label: &str) -> String {
    if old == new {
        return String::new();
    }
    match (std::str::from_utf8(old), std::str::from_utf8(new)) {
        (Ok(a), Ok(b)) => similar::TextDiff::configure()
            .timeout(std::time::Duration::from_secs(5))
            .diff_lines(a, b)
            .unified_diff()
            .context_radius(3)
            .header(old_label, new_label)
            .to_string(),
        _ => format!("Binary files {old_label} and {new_label} differ\n"),
    }
}
