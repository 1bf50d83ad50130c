//! The process's Prometheus metrics: one registry per process (so `vgrid up`, every role in one
//! process, serves one page), the families every role shares (HTTP requests by route and
//! status), scrape-time refreshers (gauges computed from a role's state when scraped), and the
//! `/metrics` listener.
//!
//! The page is served **unauthenticated, over plain HTTP, on its own address only**
//! (`--metrics-listen ADDR`, off by default), never on a role's API port: an operator binds it
//! to loopback or to a management network, as node_exporter's is. It says how many VMs, hosts
//! and requests there are, never who owns them (no user or VM names in labels).

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Labels as name/value pairs.
pub type Labels = Vec<(String, String)>;
/// A histogram family whose buckets come from a plain function (nameable in a `static`).
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

type Refresher = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

struct Global {
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Refresher>>,
}

fn global() -> &'static Global {
    static G: OnceLock<Global> = OnceLock::new();
    G.get_or_init(|| Global { registry: Mutex::new(Registry::default()), refreshers: Mutex::new(Vec::new()) })
}

/// Adds `metric` to the process's page as `name` (counters get `_total` appended).
pub fn register(name: &str, help: &str, metric: impl Metric) {
    global().registry.lock().unwrap().register(name, help, metric);
}

/// Runs `f` (and awaits its future) before every scrape: for gauges that are read from a
/// role's state (VMs by state, heartbeat ages, queue lengths) rather than counted as things
/// happen.
pub fn on_scrape<F, Fut>(f: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    global().refreshers.lock().unwrap().push(Box::new(move || Box::pin(f())));
}

/// The page in the OpenMetrics text format (which Prometheus reads), after the refreshers ran.
pub async fn render() -> String {
    let pending: Vec<_> = global().refreshers.lock().unwrap().iter().map(|f| f()).collect();
    for p in pending {
        p.await;
    }
    let mut out = String::new();
    encode(&mut out, &global().registry.lock().unwrap()).expect("writing to a String");
    out
}

/// Seconds-scale buckets from 1 ms to ~65 s (doubling): request, fetch and read latencies.
pub fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Buckets from 0.1 s to ~30 min (doubling): migrations, suspends, resumes.
pub fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

/// A histogram family with [`latency_buckets`].
pub fn latency_family() -> HistogramFamily {
    Family::new_with_constructor(latency_buckets as fn() -> Histogram)
}

/// A histogram family with [`duration_buckets`].
pub fn duration_family() -> HistogramFamily {
    Family::new_with_constructor(duration_buckets as fn() -> Histogram)
}

/// `[(k, v), ...]` as [`Labels`].
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

struct Http {
    requests: Family<Labels, Counter>,
    seconds: HistogramFamily,
}

fn http() -> &'static Http {
    static H: OnceLock<Http> = OnceLock::new();
    H.get_or_init(|| {
        let h = Http { requests: Family::default(), seconds: latency_family() };
        register(
            "vgrid_http_requests",
            "HTTP requests answered, by role, route (the matched path pattern), method and status",
            h.requests.clone(),
        );
        register("vgrid_http_request_seconds", "Time to the response's headers, by role and route", h.seconds.clone());
        h
    })
}

/// Makes the shared families appear on the page (with no samples yet).
pub fn init() {
    http();
}

/// The axum middleware that counts a role's requests: add it with
/// `router.route_layer(axum::middleware::from_fn(|r: axum::extract::Request, n: axum::middleware::Next| vgrid_trust::metrics::track("coordinator", r, n)))`.
/// (`route_layer`: requests that match no route are not counted). The route is the matched
/// pattern (`/api/v1/vms/{id}`), never the raw path, so the number of series stays bounded.
pub async fn track(role: &'static str, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let h = http();
    h.requests.get_or_create(&labels(&[("role", role), ("route", &route), ("method", &method), ("status", &status)])).inc();
    h.seconds.get_or_create(&labels(&[("role", role), ("route", &route)])).observe(t0.elapsed().as_secs_f64());
    resp
}

async fn page() -> Response {
    let body = render().await;
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

/// Serves `GET /metrics` on `addr` (plain HTTP, no authentication: see the module's note) in a
/// background task; returns the bound address.
pub async fn serve(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    init();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route("/metrics", axum::routing::get(page));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_page_has_registered_families_and_refreshed_values() {
        let c: Counter = Counter::default();
        register("vgrid_test_things", "things counted in a test", c.clone());
        c.inc_by(3);
        let g: prometheus_client::metrics::gauge::Gauge = Default::default();
        register("vgrid_test_level", "a level set when scraped", g.clone());
        on_scrape(move || {
            let g = g.clone();
            async move {
                g.set(7);
            }
        });
        let page = render().await;
        assert!(page.contains("# TYPE vgrid_test_things counter\n") && page.contains("vgrid_test_things_total 3\n"), "{page}");
        assert!(page.contains("vgrid_test_level 7\n"), "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
    }
}
