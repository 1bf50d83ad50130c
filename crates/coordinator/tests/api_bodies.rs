//! Property tests over the REST API's request bodies, through the real router, middleware and
//! handlers (in process; no host or image server behind them): whatever a client sends, the
//! answer is a success or an error that says something (a 4xx, or a 502/503 naming the missing
//! upstream), never an internal error, a panic or a hang, and nothing is created.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use tower::ServiceExt;
use vgrid_coordinator::auth::{sign_challenge, Auth};
use vgrid_coordinator::hosts::Registry;
use vgrid_coordinator::state::{self, StateConfig};
use vgrid_coordinator::Coordinator;

struct Api {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    token: String,
}

fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (router, token) = rt.block_on(async {
        let state = state::open(&StateConfig::Redb(dir.path().join("s.redb"))).unwrap();
        let auth = Auth::new(state.records(), Some(dir.path().join("audit.log")), Duration::from_secs(3600)).await.unwrap();
        let key = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        auth.bootstrap_admin("admin", &key.public_key().to_openssh().unwrap()).await.unwrap();
        let c = auth.challenge("admin").unwrap();
        let token = auth.login("admin", &c.nonce, &sign_challenge(&key, &c.message).unwrap()).await.unwrap().token;
        let registry = Arc::new(Registry::new(Duration::from_secs(5), Duration::from_secs(15)));
        let coord = Coordinator::new(state.clone(), registry).await.unwrap();
        coord.recover_interrupted().await.unwrap();
        (vgrid_coordinator::http::router(coord, auth, None), token)
    });
    Api { _dir: dir, rt, router, token }
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Body::from(body))
            .unwrap();
        self.rt.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(20), self.router.clone().oneshot(req))
                .await
                .expect("the API answered within 20 s")
                .unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
        })
    }
}

/// Arbitrary JSON, biased towards the fields the bodies have.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("image".to_string()),
        Just("name".to_string()),
        Just("cpus".to_string()),
        Just("memory_mib".to_string()),
        Just("require".to_string()),
        Just("rank".to_string()),
        Just("forwards".to_string()),
        Just("keys".to_string()),
        Just("user".to_string()),
        Just("nonce".to_string()),
        Just("signature".to_string()),
        Just("vms".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("sample")),
        Just(serde_json::Value::from("host.free_cpus >= 1 && host.labels.site == 'x'")),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/api/v1/vms"),
    ("POST", "/api/v1/futures"),
    ("POST", "/api/v1/users"),
    ("PUT", "/api/v1/users/admin/quota"),
    ("POST", "/api/v1/auth/challenge"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/vms/vm-000000000000/stop"),
    ("POST", "/api/v1/vms/vm-000000000000/resume"),
    ("POST", "/api/v1/vms/vm-000000000000/snapshot"),
    ("POST", "/api/v1/vms/vm-000000000000/migrate"),
    ("POST", "/api/v1/hosts/heartbeat"),
    ("POST", "/api/v1/image-servers/heartbeat"),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_json_body_gets_a_clear_answer(body in json(), which in 0..ENDPOINTS.len()) {
        thread_local!(static API: Api = api());
        let (method, path) = ENDPOINTS[which];
        API.with(|a| {
            let (status, answer) = a.call(method, path, serde_json::to_vec(&body).unwrap());
            // A body that asks for something real may reach an upstream that is not there
            // (no image server in this test): 502/503 naming it. Never an internal error.
            prop_assert!(
                !status.is_server_error() || status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
                "{method} {path} {body} -> {status} {answer}"
            );
            if status.is_client_error() || status.is_server_error() {
                let msg = answer["error"].as_str().unwrap_or_default();
                prop_assert!(!msg.trim().is_empty(), "{method} {path} {body} -> {status} without a message: {answer}");
            }
            // Nothing is placed without an image server: no VM record appears.
            let (_, vms) = a.call("GET", "/api/v1/vms", Vec::new());
            prop_assert_eq!(vms.as_array().map(|v| v.len()), Some(0), "{} {} {} created a VM: {}", method, path, body, vms);
            Ok(())
        })?;
    }

    #[test]
    fn any_bytes_as_a_body_get_a_clear_answer(bytes in prop::collection::vec(any::<u8>(), 0..256), which in 0..ENDPOINTS.len()) {
        thread_local!(static API: Api = api());
        let (method, path) = ENDPOINTS[which];
        API.with(|a| {
            let (status, answer) = a.call(method, path, bytes.clone());
            prop_assert!(
                !status.is_server_error() || status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
                "{method} {path} {bytes:?} -> {status} {answer}"
            );
            Ok(())
        })?;
    }
}

/// A number written as a float with no fraction is the integer it is (JSON Schema's view, and
/// the documents'): `"vms": 3.0` sets a quota of 3; a fraction is still a 400.
#[test]
fn integers_written_as_floats_are_integers() {
    let a = api();
    let (status, answer) = a.call("PUT", "/api/v1/users/admin/quota", br#"{"vms": 3.0, "cpus": 1.6e1, "memory_mib": 4096}"#.to_vec());
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["quota"], serde_json::json!({"vms": 3, "cpus": 16, "memory_mib": 4096}), "{answer}");
    let (status, answer) = a.call("PUT", "/api/v1/users/admin/quota", br#"{"vms": 3.5}"#.to_vec());
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("3.5"), "{answer}");
}
