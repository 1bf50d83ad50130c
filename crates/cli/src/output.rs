//! Tables, sizes and JSON output.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde::Serialize;

pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// 1536 → "1.5 KiB".
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Parses "256K", "64KiB", "1M", "10G", "4096".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 256K, 1M, 10G"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("invalid size unit {u:?} in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: seconds ("600"), or a number with a unit: "90s", "10m", "2h", "7d".
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 10m, 2h, 7d"))?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        u => return Err(format!("invalid duration unit {u:?} in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mul).map(std::time::Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too long"))
}

/// Parses a bound on a wait: a duration ([`parse_duration`]), or `never` (also `0`): no bound,
/// returned as zero.
pub fn parse_bound(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "never" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(s)
}

pub fn age(epoch: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let d = now.saturating_sub(epoch);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Progress of a command that waits: an indicatif bar or spinner on a terminal; plain lines on
/// stderr when it is not one (piped, logged: a new message, or each tenth of a transfer, as
/// its own line); nothing with `--json` (stdout then carries only the JSON; stderr stays quiet).
pub struct Progress {
    bar: indicatif::ProgressBar,
    plain: Option<std::sync::Mutex<Plain>>,
}

struct Plain {
    what: String,
    last_message: String,
    tenth: Option<u64>,
}

impl Progress {
    fn new(bar: indicatif::ProgressBar, quiet: bool, what: &str) -> Progress {
        use std::io::IsTerminal;
        let plain = if quiet {
            None
        } else if std::io::stderr().is_terminal() {
            return Progress { bar, plain: None };
        } else {
            Some(std::sync::Mutex::new(Plain { what: what.to_string(), last_message: String::new(), tenth: None }))
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        Progress { bar, plain }
    }

    /// A spinner with a message (`quiet`: `--json`).
    pub fn spinner(quiet: bool, message: impl Into<String>) -> Progress {
        let p = Progress::new(indicatif::ProgressBar::new_spinner(), quiet, "");
        p.bar.enable_steady_tick(std::time::Duration::from_millis(120));
        p.set_message(message);
        p
    }

    /// A byte transfer of `total` bytes (0: not known yet) called `what`.
    pub fn bytes(quiet: bool, total: u64, what: &str) -> Progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress::new(bar, quiet, what)
    }

    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap();
            if p.last_message != message {
                eprintln!("{message}");
                p.last_message = message.clone();
            }
        }
        self.bar.set_message(message);
    }

    pub fn set_length(&self, total: u64) {
        self.bar.set_length(total);
    }

    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
        let Some(p) = &self.plain else { return };
        let total = self.bar.length().unwrap_or(0);
        if total == 0 {
            return;
        }
        let tenth = done.min(total) * 10 / total;
        let mut p = p.lock().unwrap();
        if p.tenth.is_none_or(|t| tenth > t) {
            eprintln!("{}: {} of {} ({}%)", p.what, bytes(done), bytes(total), tenth * 10);
            p.tenth = Some(tenth);
        }
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// An error and its causes, as `{:#}` prints them (`outer: cause: cause...`), leaving out a
/// cause whose text is already part of what came before: the workspace's errors name their
/// cause in their own message and also keep it as their `source`.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if s.is_empty() {
            s = text;
        } else if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose message is `text` (naming its cause or not), its cause its source.
    #[derive(Debug)]
    struct Failed {
        text: String,
        cause: std::io::Error,
    }
    impl std::fmt::Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.text)
        }
    }
    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.cause)
        }
    }

    #[test]
    fn durations_and_bounds() {
        use std::time::Duration;
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration(" 2h "), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("10 minutes").unwrap_err().contains("10 minutes"));
        assert!(parse_duration("m").unwrap_err().contains("invalid duration"));
        assert!(parse_duration("99999999999999999d").unwrap_err().contains("too long"));
        assert_eq!(parse_bound("never"), Ok(Duration::ZERO));
        assert_eq!(parse_bound("0"), Ok(Duration::ZERO));
        assert_eq!(parse_bound("5m"), Ok(Duration::from_secs(300)));
    }

    #[test]
    fn error_chains_name_each_cause_once() {
        let failed = |text: &str| Failed { text: text.into(), cause: std::io::Error::other("disk on fire") };
        let e = anyhow::Error::new(failed("reading /x: disk on fire")).context("loading the config");
        assert_eq!(format!("{e:#}"), "loading the config: reading /x: disk on fire: disk on fire");
        assert_eq!(error_chain(&e), "loading the config: reading /x: disk on fire");
        let e = anyhow::Error::new(failed("opaque failure")).context("saving");
        assert_eq!(error_chain(&e), format!("{e:#}"));
        assert_eq!(error_chain(&e), "saving: opaque failure: disk on fire");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256K").unwrap(), 262144);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("x").is_err());
        assert!(parse_size("3Q").is_err());
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
