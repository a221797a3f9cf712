//! An error written with its causes on one line: `connection refused` often
//! sits a few levels below what a client library reports. Pure.

/// `e` and each of its sources, joined with `: `.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
