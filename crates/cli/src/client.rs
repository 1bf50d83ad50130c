//! A small REST client for the coordinator's API: JSON in, JSON out, errors carrying the
//! server's message.

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vgrid_api::ErrorBody;

/// How many times a request answered 503 with Retry-After is sent again.
const RETRY_503: u32 = 10;

/// An error answer of the coordinator: its status and message (shown as "MESSAGE (HTTP N)").
#[derive(Debug)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// Whether `e` is an answer that says "not now" rather than "no": a host or image server
    /// the coordinator could not reach (502), or a condition that passes (503, 504). A caller
    /// following a VM waits through it and reports the VM's real end state.
    pub fn is_transient(e: &anyhow::Error) -> bool {
        e.downcast_ref::<HttpError>().is_some_and(|h| matches!(h.status, 502..=504))
    }
}

#[derive(Clone)]
pub struct Api {
    /// The coordinators of the grid, in the order given (one, or several comma-separated).
    urls: std::sync::Arc<Vec<String>>,
    /// Which of `urls` is used now: the first that accepted a connection, then the one a
    /// failed request moved to.
    at: std::sync::Arc<std::sync::Mutex<usize>>,
    /// Rebuilt when a move trusts another coordinator's CA (a client keeps the roots it was
    /// built with).
    http: std::sync::Arc<std::sync::Mutex<reqwest::Client>>,
    /// The bearer token, once known (loaded from the token file or from a login).
    token: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Why the CA of the coordinator used now could not be pinned, if it could not.
    trust_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// Whether a request of `method` may be sent again after an answer that may have been lost:
/// GET and HEAD change nothing; a POST only when the caller says so ([`Api::post_retryable`]).
fn resendable(method: &reqwest::Method, safe_post: bool) -> bool {
    *method == reqwest::Method::GET || *method == reqwest::Method::HEAD || (safe_post && *method == reqwest::Method::POST)
}

impl Api {
    /// `base` may list several coordinators of one grid, comma-separated (`VGRID_URL=https://c1:7070,https://c2:7070`):
    /// the first that accepts a connection is used, and a request that coordinator fails is
    /// sent to the next one (see [`Api::send`]).
    pub fn new(base: &str) -> Self {
        let urls: Vec<String> = base.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
        let urls = if urls.is_empty() { vec![base.trim().trim_end_matches('/').to_string()] } else { urls };
        let picked = pick_coordinator(base).trim_end_matches('/').to_string();
        let at = urls.iter().position(|u| *u == picked).unwrap_or(0);
        // The grid's tokens are kept in its shared state: one saved for another coordinator of
        // the list is good here too.
        let token = crate::auth::saved_token(&urls[at]).or_else(|| urls.iter().find_map(|u| crate::auth::saved_token(u)));
        // TLS to the coordinator trusts the CA pinned for it (pinned now at first contact); a
        // failure to pin is reported if the request then fails.
        let trust_error = crate::trust::trust(&urls[at]).err().map(|e| crate::output::error_chain(&e));
        Api {
            urls: std::sync::Arc::new(urls),
            at: std::sync::Arc::new(std::sync::Mutex::new(at)),
            http: std::sync::Arc::new(std::sync::Mutex::new(vgrid_trust::tls::client_builder().build().expect("HTTP client"))),
            token: std::sync::Arc::new(std::sync::Mutex::new(token)),
            trust_error: std::sync::Arc::new(std::sync::Mutex::new(trust_error)),
        }
    }

    /// The coordinator used now.
    pub fn base(&self) -> String {
        self.urls[*self.at.lock().unwrap_or_else(|e| e.into_inner())].clone()
    }

    /// Moves from coordinator `from` to the next one of the list (trusting its CA), says so on
    /// stderr with `why`, and returns it. Another request of this process may have moved
    /// already: then that one is used.
    fn move_on(&self, from: &str, why: &str) -> String {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if self.urls[*at] == from {
            *at = (*at + 1) % self.urls.len();
            let next = self.urls[*at].clone();
            *self.trust_error.lock().unwrap_or_else(|e| e.into_inner()) =
                crate::trust::trust(&next).err().map(|e| crate::output::error_chain(&e));
            if let Ok(c) = vgrid_trust::tls::client_builder().build() {
                *self.http.lock().unwrap_or_else(|e| e.into_inner()) = c;
            }
            if self.token().is_none() {
                self.set_token(crate::auth::saved_token(&next));
            }
            eprintln!("vgrid: coordinator {from} {why}; moving to {next}");
        }
        self.urls[*at].clone()
    }

    pub fn http(&self) -> reqwest::Client {
        self.http.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current bearer token, if any.
    pub fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_token(&self, t: Option<String>) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// A request with the bearer token attached, to the coordinator used now.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http().request(method, format!("{}{path}", self.base()));
        match self.token() {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends a request and reads its JSON answer. With several coordinators, the request goes
    /// to the next one of the list when the one used refuses the connection (nothing was sent:
    /// any request), when it resets or drops the connection, times out or breaks off its
    /// answer (only a request that may be sent twice: [`resendable`]), or when it answers 503
    /// (it did nothing: not ready, not leading yet). Each coordinator is tried at most twice
    /// per request; a 503 from all of them is retried after its Retry-After.
    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        safe_post: bool,
    ) -> anyhow::Result<T> {
        let what = format!("{method} {path}");
        let resend = resendable(&method, safe_post);
        let several = self.urls.len() > 1;
        let mut moves = 0;
        let max_moves = 2 * self.urls.len().saturating_sub(1);
        let mut logged_in = false;
        let mut retried = 0;
        loop {
            let base = self.base();
            let mut req = self.request(method.clone(), path);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    if several && moves < max_moves && (e.is_connect() || resend) {
                        moves += 1;
                        let why = if e.is_connect() { "did not take the connection" } else { "dropped the request" };
                        let cause = crate::output::error_chain(&anyhow::Error::new(e));
                        self.move_on(&base, &format!("{why} ({what}: {cause})"));
                        continue;
                    }
                    if let Some(why) = self.trust_error.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                        return Err(anyhow!("{why}"));
                    }
                    if let Some(why) = crate::trust::explain_failure(&base) {
                        return Err(anyhow!("refusing {base} ({what}): {why}"));
                    }
                    return Err(anyhow!(
                        "cannot reach vgrid at {base} ({what}): {e:#}. Is `vgrid up` running? Set VGRID_URL or --url to its address."
                    ));
                }
            };
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(|s| std::time::Duration::from_secs(s.clamp(1, 10)));
            let body_bytes = match resp.bytes().await {
                Ok(b) => b,
                Err(e) if several && resend && moves < max_moves => {
                    moves += 1;
                    self.move_on(&base, &format!("broke off its answer ({what}: {e:#})"));
                    continue;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("reading the answer to {what} from {base}"))),
            };
            if status == reqwest::StatusCode::UNAUTHORIZED && !logged_in && !path.starts_with("/api/v1/auth/") {
                // No token or an expired one: log in with the local key and try once more.
                if Box::pin(crate::auth::login(self, None, None)).await.is_ok() {
                    logged_in = true;
                    continue;
                }
            }
            if !status.is_success() {
                let message = serde_json::from_slice::<ErrorBody>(&body_bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body_bytes).into_owned());
                if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && retried < RETRY_503 {
                    // Nothing was done: another coordinator may serve it now, or this one
                    // says when to ask again (e.g. right after its restart, before the image
                    // servers reported in).
                    if several && moves < max_moves {
                        moves += 1;
                        self.move_on(&base, &format!("is not ready ({what}: {message}, HTTP 503)"));
                        continue;
                    }
                    if let Some(wait) = retry_after {
                        retried += 1;
                        moves = 0;
                        tracing::debug!("{what}: {message} (HTTP 503); retrying in {wait:?}");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                return Err(HttpError { status: status.as_u16(), message }.into());
            }
            return serde_json::from_slice(&body_bytes).with_context(|| format!("malformed answer to {what} from {base}"));
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send::<(), T>(reqwest::Method::GET, path, None, false).await
    }
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(reqwest::Method::POST, path, Some(body), false).await
    }
    /// A POST that may be sent twice (a create carrying its `request_id`, a login challenge):
    /// with several coordinators, it is sent to the next one whatever became of it.
    pub async fn post_retryable<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(reqwest::Method::POST, path, Some(body), true).await
    }
    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(reqwest::Method::PUT, path, Some(body), false).await
    }
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send::<(), T>(reqwest::Method::DELETE, path, None, false).await
    }
}

/// The first of the comma-separated coordinator URLs in `list` that accepts a TCP connection
/// (within 2 s each), else the first: its error is then the one reported.
pub fn pick_coordinator(list: &str) -> String {
    let urls: Vec<&str> = list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if urls.len() < 2 {
        return list.trim().to_string();
    }
    let reachable = |url: &str| -> bool {
        let Ok(u) = reqwest::Url::parse(url) else { return false };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)) else { return false };
        addrs.into_iter().any(|a| std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok())
    };
    match urls.iter().find(|u| reachable(u)) {
        Some(u) => u.to_string(),
        None => urls[0].to_string(),
    }
}

#[cfg(test)]
mod failover_tests {
    #[test]
    fn the_first_reachable_coordinator_is_used() {
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down_port = down.local_addr().unwrap().port();
        drop(down);
        let up_url = format!("https://127.0.0.1:{}", up.local_addr().unwrap().port());
        let down_url = format!("https://127.0.0.1:{down_port}");
        assert_eq!(super::pick_coordinator(&format!("{down_url},{up_url}")), up_url);
        assert_eq!(super::pick_coordinator(&format!("{up_url}, {down_url}")), up_url);
        assert_eq!(super::pick_coordinator(&down_url), down_url);
        assert_eq!(super::pick_coordinator(&format!("{down_url},{down_url}")), down_url);
    }
}
