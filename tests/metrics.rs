//! Prometheus metrics (issue 17, item 3): every role of a grid of separate processes serves
//! `/metrics` on its own `--metrics-listen` address; after the sample guest booted, was refused
//! once, suspended and resumed, each page parses with the official Python client's OpenMetrics
//! parser (installed by scripts/install-deps.sh) and says what happened.

mod common;

use common::grid::RoleGrid;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Python with `prometheus_client` (scripts/install-deps.sh puts it there).
fn parser_python() -> PathBuf {
    common::tool_python("prometheus-client-0.26.0")
}

/// Parses a page strictly (the OpenMetrics parser raises on any malformed line, and on a page
/// without its `# EOF`); one sample per line: NAME{LABELS} VALUE, labels sorted.
const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;

/// One scraped page: sample (`name{k="v",...}`, labels sorted) to value.
struct Page(HashMap<String, f64>);

impl Page {
    fn get(&self, key: &str) -> f64 {
        *self.0.get(key).unwrap_or_else(|| panic!("no sample {key} in:\n{}", self.dump()))
    }
    /// The sum over samples named `name` whose labels include every one of `with`.
    fn sum(&self, name: &str, with: &[&str]) -> f64 {
        self.0.iter().filter(|(k, _)| k.starts_with(&format!("{name}{{")) && with.iter().all(|w| k.contains(w))).map(|(_, v)| v).sum()
    }
    fn dump(&self) -> String {
        let mut v: Vec<String> = self.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
        v.sort();
        v.join("\n")
    }
}

fn scrape(url: &str) -> Page {
    let o = Command::new("curl").args(["-sf", "-D", "/dev/stderr", url]).output().unwrap();
    assert!(o.status.success(), "GET {url}: {}", String::from_utf8_lossy(&o.stderr));
    let headers = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(headers.contains("content-type: application/openmetrics-text"), "{headers}");
    let mut p = Command::new(parser_python())
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    p.stdin.take().unwrap().write_all(&o.stdout).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the page of {url} does not parse: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let samples = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap())
        })
        .collect();
    Page(samples)
}

/// The metrics URL a role printed to its log.
fn metrics_url(log: &Path) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("metrics at http://")) {
            return l.trim_start_matches("metrics at ").trim().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{} names no metrics address:\n{text}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_role_serves_metrics_that_parse_and_count_what_happened() {
    let g = RoleGrid::start_env(&["h1"], &[("VGRID_METRICS_LISTEN", "127.0.0.1:0")]);
    let v = g.run_on("h1", "counted");
    let id = v["id"].as_str().unwrap().to_string();
    // One refusal: no host is called nope.
    let o = g.cli(&["vm", "run", "sample", "--no-wait", "--require", "host.name == \"nope\""]);
    assert!(!o.status.success());
    let s = g.json(&["vm", "suspend", &id]);
    assert_eq!(s["vm"]["state"], "suspended", "{s}");
    let r = g.json(&["vm", "resume", &id, "--timeout", "300"]);
    assert_eq!(r["state"], "running", "{r}");

    let coord = scrape(&metrics_url(&g.dir.path().join("coord.log")));
    assert!(coord.get(r#"vgrid_placements_total{kind="run"}"#) >= 1.0, "{}", coord.dump());
    assert_eq!(coord.get(r#"vgrid_placements_total{kind="resume"}"#), 1.0);
    assert_eq!(coord.get(r#"vgrid_placement_refusals_total{kind="run",reason="requirement_or_policy"}"#), 1.0);
    assert_eq!(coord.get(r#"vgrid_vms{state="running"}"#), 1.0);
    assert_eq!(coord.get(r#"vgrid_vms{state="suspended"}"#), 0.0);
    assert_eq!(coord.get(r#"vgrid_suspend_duration_seconds_count{}"#), 1.0);
    assert!(coord.get(r#"vgrid_suspend_duration_seconds_sum{}"#) > 0.0);
    assert_eq!(coord.get(r#"vgrid_resume_duration_seconds_count{}"#), 1.0);
    assert_eq!(coord.get(r#"vgrid_scheduler_queue_length{}"#), 0.0);
    assert_eq!(coord.get(r#"vgrid_coordinator_leader{}"#), 1.0, "a coordinator alone on its state leads");
    let age = coord.get(r#"vgrid_host_heartbeat_age_seconds{host="h1"}"#);
    assert!((0.0..30.0).contains(&age), "heartbeat age {age}");
    assert!(coord.sum("vgrid_http_requests_total", &[r#"role="coordinator""#, r#"route="/api/v1/vms""#, r#"method="POST""#]) >= 2.0);
    assert_eq!(
        coord.sum("vgrid_http_requests_total", &[r#"route="/api/v1/vms/{id}/suspend""#, r#"status="200""#]),
        1.0,
        "{}",
        coord.dump()
    );

    let host = scrape(&metrics_url(&g.hosts[0].1.log));
    assert!(host.get("vgrid_chunk_cache_misses_total{}") >= 1.0, "{}", host.dump());
    assert!(host.get("vgrid_nbd_reads_total{}") >= 1.0);
    assert!(host.get("vgrid_nbd_read_seconds_count{}") >= 1.0);
    assert!(host.sum("vgrid_chunk_fetches_total", &[r#"result="ok""#]) >= 1.0);
    assert!(host.sum("vgrid_chunk_fetch_bytes_total", &[]) > 0.0);
    // Labelled by the image server's URL.
    let port = g._server.url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    assert!(host.sum("vgrid_chunk_fetch_seconds_count", &[&format!("127.0.0.1:{port}")]) >= 1.0, "{}", host.dump());
    assert!(host.sum("vgrid_http_requests_total", &[r#"role="host""#, r#"route="/host/v1/vms""#, r#"method="POST""#]) >= 1.0);

    let server = scrape(&metrics_url(&g.dir.path().join("is0.log")));
    assert!(server.sum("vgrid_http_requests_total", &[r#"role="image-server""#, "chunks", r#"status="200""#]) >= 1.0, "{}", server.dump());
    assert_eq!(server.sum("vgrid_http_requests_total", &[r#"role="coordinator""#]), 0.0, "the image server counts only its own");
    let _ = g.cli(&["vm", "rm", "--force", &id]);
}
