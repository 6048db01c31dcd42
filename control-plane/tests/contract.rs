//! The API contract: `/openapi.json` (generated from the handlers) describes
//! every route, and schemathesis, run against a live control plane with the
//! admin token and with an agent token, finds no 5xx and no response that
//! differs from the document (status codes, content types, bodies). Needs
//! `st` (PyPI `schemathesis`): without it the test prints SKIPPED, and with
//! DETOUR_REQUIRE_TOOLS=1 (CI) it fails instead.

mod support;

use std::process::Command;

use support::{ADMIN_TOKEN, Backend, Db, Instance};

fn schemathesis() -> Option<&'static str> {
    let found = Command::new("st")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("st");
    }
    assert!(
        std::env::var("DETOUR_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "schemathesis is required but `st` is not installed (pip install schemathesis)"
    );
    eprintln!("SKIPPED: API contract suite: `st` is not installed (pip install schemathesis)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route() {
    let db = Db::new(Backend::Sqlite, "openapi_doc").await.unwrap();
    let cp = Instance::start(db.config("", "")).await;
    let r = cp.client.get(cp.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/calls", "post"),
        ("/v1/calls/{id}", "get"),
        ("/v1/calls/{id}/events", "post"),
        ("/v1/calls/{id}/recordings", "post"),
        ("/v1/routes", "get"),
        ("/v1/routes/{name}", "get"),
        ("/v1/routes/{name}", "put"),
        ("/v1/routes/{name}", "delete"),
        ("/v1/audit", "get"),
        ("/v1/agents/{pop}/report", "post"),
        ("/v1/fleet", "get"),
        ("/v1/fleet/view", "get"),
        ("/fleet", "get"),
        ("/fleet/login", "get"),
        ("/fleet/login", "post"),
        ("/fleet/logout", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not in the document"
        );
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_contract() {
    let Some(st) = schemathesis() else { return };
    let db = Db::new(Backend::Sqlite, "contract").await.unwrap();
    let cp = Instance::start(db.config("", "[limits]\nper_pop_rps = 0\n")).await;
    cp.put_route(
        "india",
        serde_json::json!({"prefix": "+91", "trunk": "t1", "pop": "blr"}),
    )
    .await;
    let agent = cp.token("blr").await;
    for (who, token) in [("admin", ADMIN_TOKEN), ("agent blr", agent.as_str())] {
        let out = tokio::task::spawn_blocking({
            let (url, header) = (cp.url("/openapi.json"), format!("Authorization: Bearer {token}"));
            move || {
                Command::new(st)
                    .args(["run", &url, "-H", &header, "--checks", "all"])
                    // The schema cannot say which phone numbers exist or
                    // which PoP names are taken, so "every schema-valid
                    // request is accepted" does not hold by design.
                    .args(["--exclude-checks", "positive_data_acceptance"])
                    .args(["--max-examples", "40", "--generation-deterministic", "--no-color"])
                    .output()
                    .expect("run st")
            }
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {who} found problems:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Vec<&str> = text.lines().filter(|l| l.contains("generated")).collect();
        eprintln!("schemathesis as {who}: {summary:?}");
    }
    cp.stop().await;
}
