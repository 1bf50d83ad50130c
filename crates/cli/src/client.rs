//! A small REST client for the coordinator's API: JSON in, JSON out, errors carrying the
//! server's message.

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vgrid_api::ErrorBody;

#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Self {
        Api { base: base.trim_end_matches('/').to_string(), http: reqwest::Client::new() }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| {
            anyhow!("cannot reach vgrid at {} ({what}): {e}. Is `vgrid up` running? Set VGRID_URL or --url to its address.", self.base)
        })?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("reading the answer to {what}"))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(anyhow!("{msg} (HTTP {})", status.as_u16()));
        }
        serde_json::from_slice(&body).with_context(|| format!("malformed answer to {what} from {}", self.base))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)), &format!("GET {path}")).await
    }
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body), &format!("POST {path}")).await
    }
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)), &format!("DELETE {path}")).await
    }
}
