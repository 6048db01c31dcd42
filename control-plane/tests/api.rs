//! The API suite, written once and run against SQLite and Postgres
//! (`DATABASE_URL`), over real loopback sockets.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Backend, Db, Instance, problem, wait_until};
use tokio::sync::Notify;

/// `t0` plus `secs`, as an RFC 3339 time in whole seconds.
fn at(t0: chrono::DateTime<chrono::Utc>, secs: i64) -> String {
    let t = t0 + chrono::Duration::seconds(secs);
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The same time as the API shows it (milliseconds).
fn at_millis(t0: chrono::DateTime<chrono::Utc>, secs: i64) -> String {
    let whole = chrono::DateTime::parse_from_rfc3339(&at(t0, secs)).unwrap();
    whole
        .to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Runs `$body(Backend)` as `sqlite_$name` and `postgres_$name`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

both!(
    health_ready_and_metrics,
    call_initiation_routes_and_normalises,
    bad_input_is_a_clear_4xx_problem,
    emergency_calls_are_relaxed_reserved_and_never_rate_limited,
    auth_is_enforced_with_problem_json,
    idempotency_50_concurrent_duplicates_create_one_call,
    idempotency_keys_expire_after_retention,
    events_build_a_consistent_record_in_any_order,
    recordings_are_listed_once_and_a_different_object_under_a_key_conflicts,
    routes_admin_is_validated_versioned_and_audited,
    hook_timeout_error_and_breaker_fall_back,
    normal_calls_are_shed_when_saturated_but_emergency_is_not,
    fleet_reports_latest_per_pop,
);

async fn db(backend: Backend, test: &str) -> Option<Db> {
    Db::new(backend, test).await
}

fn call_body() -> Value {
    json!({"caller": "+919876543210", "destination": "08041234567",
           "call_type": "outbound", "priority": "normal", "metadata": {"campaign": "x"}})
}

async fn health_ready_and_metrics(backend: Backend) {
    let Some(db) = db(backend, "health_ready_and_metrics").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let r = cp.client.get(cp.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = cp.client.get(cp.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    cp.client.get(cp.url("/healthz")).send().await.unwrap();
    // One call with a key: it goes through group commit.
    let token = cp.token("blr").await;
    let route = json!({"prefix": "+9180", "trunk": "t", "pop": "blr"});
    assert_eq!(cp.put_route("blr", route).await.status(), 201);
    assert_eq!(
        cp.post_call(&token, &call_body(), Some("metrics-1"))
            .await
            .status(),
        201
    );
    let text = cp
        .client
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("detour_cp_requests_total{route=\"/healthz\",status=\"200\"}"),
        "{text}"
    );
    assert!(text.contains("detour_cp_db_up 1"), "{text}");
    let build = format!(
        "detour_build_info{{binary=\"detour-control-plane\",version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "{text}");
    for name in ["detour_cp_db_batches_total", "detour_cp_db_batched_calls_total"] {
        assert!(text.contains(&format!("\n{name} 1\n")), "{name} 1: {text}");
    }
    cp.stop().await;
    db.finish().await;
}

async fn call_initiation_routes_and_normalises(backend: Backend) {
    let Some(db) = db(backend, "call_initiation_routes_and_normalises").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let r = cp
        .put_route(
            "blr-mobile",
            json!({"prefix": "+9180", "trunk": "blr-carrier-1", "pop": "blr"}),
        )
        .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = cp
        .put_route(
            "india",
            json!({"prefix": "+91", "trunk": "del-carrier-1", "pop": "del"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let token = cp.token("blr").await;

    let r = cp.post_call(&token, &call_body(), None).await;
    assert_eq!(r.status(), 201);
    let call: Value = r.json().await.unwrap();
    assert_eq!(call["destination"], "+918041234567");
    assert_eq!(call["caller"], "+919876543210");
    assert_eq!(call["priority"], "normal");
    assert_eq!(call["fallback"], false);
    assert_eq!(call["route"]["rule"], "blr-mobile");
    assert_eq!(call["route"]["trunk"], "blr-carrier-1");
    assert_eq!(call["route"]["pop"], "blr");
    let id = call["call_id"].as_str().unwrap().to_owned();

    let r = cp
        .post_call(
            &token,
            &json!({"caller": "9876543210", "destination": "098765 43211"}),
            None,
        )
        .await;
    assert_eq!(r.status(), 201);
    let other: Value = r.json().await.unwrap();
    assert_eq!(other["route"]["rule"], "india");
    assert_eq!(other["destination"], "+919876543211");

    let r = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["state"], "initiated");
    assert_eq!(got["route"]["trunk"], "blr-carrier-1");
    assert_eq!(got["pop"], "blr");
    assert_eq!(got["metadata"]["campaign"], "x");

    let r = cp
        .client
        .get(cp.url("/v1/calls/nope"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let p = problem(r, 404).await;
    assert!(p["detail"].as_str().unwrap().contains("nope"));
    cp.stop().await;
    db.finish().await;
}

async fn bad_input_is_a_clear_4xx_problem(backend: Backend) {
    let Some(db) = db(backend, "bad_input_is_a_clear_4xx_problem").await else {
        return;
    };
    let cp = Instance::start(db.config("", "[limits]\nmax_body_bytes = 1024\n")).await;
    let token = cp.token("blr").await;
    cp.put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;

    let r = cp
        .post_call(
            &token,
            &json!({"caller": "hello", "destination": "08041234567"}),
            None,
        )
        .await;
    let p = problem(r, 422).await;
    assert_eq!(p["field"], "caller");
    assert!(p["detail"].as_str().unwrap().contains("caller"), "{p}");

    let r = cp
        .post_call(&token, &json!({"caller": "+919876543210"}), None)
        .await;
    assert_eq!(problem(r, 422).await["field"], "destination");

    let r = cp
        .post_call(
            &token,
            &json!({"caller": "+919876543210", "destination": "+14155550100"}),
            None,
        )
        .await;
    let p = problem(r, 422).await;
    assert_eq!(p["type"], "urn:detour:problem:no-route");

    let r = cp
        .client
        .post(cp.url("/v1/calls"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"caller\": ")
        .send()
        .await
        .unwrap();
    problem(r, 400).await;

    let r = cp
        .client
        .post(cp.url("/v1/calls"))
        .bearer_auth(&token)
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    problem(r, 413).await;

    let r = cp
        .client
        .post(cp.url("/v1/calls"))
        .bearer_auth(&token)
        .header("idempotency-key", "has spaces in it")
        .json(&call_body())
        .send()
        .await
        .unwrap();
    problem(r, 400).await;

    let r = cp.client.get(cp.url("/v1/nothing")).send().await.unwrap();
    problem(r, 404).await;
    let r = cp
        .client
        .delete(cp.url("/v1/calls"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    problem(r, 405).await;

    // Nothing above created a call.
    assert_eq!(cp.store().await.count_calls().await.unwrap(), 0);
    cp.stop().await;
    db.finish().await;
}

async fn emergency_calls_are_relaxed_reserved_and_never_rate_limited(backend: Backend) {
    let Some(db) = db(backend, "emergency_calls").await else {
        return;
    };
    let cp = Instance::start(db.config("", "[limits]\nper_pop_rps = 1\nper_pop_burst = 2\n")).await;
    let token = cp.token("blr").await;
    cp.put_route(
        "psap",
        json!({"prefix": "1", "trunk": "psap-blr", "pop": "blr", "priority": "emergency"}),
    )
    .await;
    cp.put_route("india", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;

    // Use up the normal budget.
    let mut limited = None;
    for _ in 0..10 {
        let r = cp.post_call(&token, &call_body(), None).await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 201);
    }
    let r = limited.expect("normal calls were never rate limited");
    assert!(r.headers().contains_key("retry-after"));
    problem(r, 429).await;

    for dest in ["112", "100", "108"] {
        let r = cp
            .post_call(
                &token,
                &json!({"destination": dest, "caller": "not a number", "priority": "normal"}),
                None,
            )
            .await;
        assert_eq!(r.status(), 201, "{dest}");
        let c: Value = r.json().await.unwrap();
        assert_eq!(c["priority"], "emergency");
        assert_eq!(c["destination"], dest);
        assert_eq!(c["caller"], "not a number");
        assert_eq!(c["route"]["trunk"], "psap-blr");
    }
    // An emergency number with no rule still gets an answer.
    cp.client
        .delete(cp.url("/v1/routes/psap"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let r = cp.post_call(&token, &json!({"destination": "101"}), None).await;
    assert_eq!(r.status(), 201);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["route"], Value::Null);
    assert_eq!(c["fallback"], true);
    cp.stop().await;
    db.finish().await;
}

async fn auth_is_enforced_with_problem_json(backend: Backend) {
    let Some(db) = db(backend, "auth_is_enforced").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let blr = cp.token("blr").await;

    let r = cp
        .client
        .post(cp.url("/v1/calls"))
        .json(&call_body())
        .send()
        .await
        .unwrap();
    problem(r, 401).await;
    let r = cp.post_call("dtr_blr_forged", &call_body(), None).await;
    problem(r, 401).await;
    let r = cp
        .client
        .get(cp.url("/v1/routes"))
        .bearer_auth(&blr)
        .send()
        .await
        .unwrap();
    problem(r, 403).await;
    let r = cp
        .client
        .put(cp.url("/v1/routes/x"))
        .bearer_auth(&blr)
        .json(&json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .send()
        .await
        .unwrap();
    problem(r, 403).await;
    let r = cp
        .client
        .get(cp.url("/v1/fleet"))
        .bearer_auth(&blr)
        .send()
        .await
        .unwrap();
    problem(r, 403).await;
    let report = json!({"pop": "maa", "version": "0.1.0", "active_path": "direct", "paths": []});
    let r = cp
        .client
        .post(cp.url("/v1/agents/maa/report"))
        .bearer_auth(&blr)
        .json(&report)
        .send()
        .await
        .unwrap();
    let p = problem(r, 403).await;
    assert!(p["detail"].as_str().unwrap().contains("blr"));
    let r = cp
        .client
        .get(cp.url("/v1/routes"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only the hash is stored.
    let hash = detour_control_plane::auth::hash_token(&blr);
    let store = cp.store().await;
    assert_eq!(store.token_pop(&hash).await.unwrap().as_deref(), Some("blr"));
    assert_eq!(store.token_pop(&blr).await.unwrap(), None);
    cp.stop().await;
    db.finish().await;
}

async fn idempotency_50_concurrent_duplicates_create_one_call(backend: Backend) {
    let Some(db) = db(backend, "idempotency_50").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    cp.put_route(
        "w",
        json!({"prefix": "+91", "pop": "blr",
        "trunks": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}),
    )
    .await;
    let token = cp.token("blr").await;
    let cp = Arc::new(cp);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let cp = cp.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let r = cp.post_call(&token, &call_body(), Some("key-dup-1")).await;
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 201, "{body}");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every duplicate gets the same body"
    );
    assert_eq!(cp.store().await.count_calls().await.unwrap(), 1);

    let r = cp.post_call(&token, &call_body(), Some("key-dup-1")).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.text().await.unwrap(), bodies[0]);

    let mut other = call_body();
    other["destination"] = json!("08041234568");
    let r = cp.post_call(&token, &other, Some("key-dup-1")).await;
    assert_eq!(problem(r, 422).await["field"], "Idempotency-Key");
    assert_eq!(cp.store().await.count_calls().await.unwrap(), 1);
    let cp = Arc::into_inner(cp).expect("all tasks done");
    cp.stop().await;
    db.finish().await;
}

async fn idempotency_keys_expire_after_retention(backend: Backend) {
    let Some(db) = db(backend, "idempotency_retention").await else {
        return;
    };
    let cp = Instance::start(db.config("", "[idempotency]\nretention = \"300ms\"\n")).await;
    cp.put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    let token = cp.token("blr").await;
    let first: Value = cp
        .post_call(&token, &call_body(), Some("k-exp"))
        .await
        .json()
        .await
        .unwrap();
    let again: Value = cp
        .post_call(&token, &call_body(), Some("k-exp"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["call_id"], again["call_id"], "replayed within retention");
    let seen = Arc::new(std::sync::Mutex::new(None));
    wait_until("a new call for the expired key", Duration::from_secs(5), || {
        let (cp, token, seen) = (&cp, &token, seen.clone());
        let first_id = first["call_id"].clone();
        async move {
            let v: Value = cp
                .post_call(token, &call_body(), Some("k-exp"))
                .await
                .json()
                .await
                .unwrap();
            let new = v["call_id"] != first_id;
            if new {
                *seen.lock().unwrap() = Some(v);
            }
            new
        }
    })
    .await;
    assert_eq!(cp.store().await.count_calls().await.unwrap(), 2);
    cp.stop().await;
    db.finish().await;
}

async fn post_event(cp: &Instance, token: &str, id: &str, ev: Value) -> reqwest::Response {
    cp.client
        .post(cp.url(&format!("/v1/calls/{id}/events")))
        .bearer_auth(token)
        .json(&ev)
        .send()
        .await
        .unwrap()
}

async fn post_recording(
    cp: &Instance,
    token: &str,
    id: &str,
    body: &Value,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = cp
        .client
        .post(cp.url(&format!("/v1/calls/{id}/recordings")))
        .bearer_auth(token)
        .json(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req.send().await.unwrap()
}

async fn recordings_are_listed_once_and_a_different_object_under_a_key_conflicts(backend: Backend) {
    let Some(db) = db(backend, "recordings").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    cp.put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    let token = cp.token("blr").await;
    let call: Value = cp
        .post_call(&token, &call_body(), None)
        .await
        .json()
        .await
        .unwrap();
    let id = call["call_id"].as_str().unwrap();
    let sha = "a".repeat(64);
    let rec = json!({"bucket": "recordings", "key": format!("blr/2026-12-05/{id}.wav"),
                     "size": 1234, "sha256": sha, "duration_seconds": 12.5, "content_type": "audio/wav"});
    // Reported twice (an agent's retry without its key, and with one): one entry.
    for key in [None, Some("rec-1"), Some("rec-1")] {
        let r = post_recording(&cp, &token, id, &rec, key).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["recordings"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["recordings"][0]["sha256"], sha);
        assert_eq!(v["recordings"][0]["duration_seconds"], 12.5);
    }
    // A second recording of the call is listed beside the first.
    let mut second = rec.clone();
    second["key"] = json!(format!("blr/2026-12-05/{id}-b.wav"));
    assert_eq!(post_recording(&cp, &token, id, &second, None).await.status(), 200);
    // Another object under the first key: 409, and nothing changes.
    let mut other = rec.clone();
    other["sha256"] = json!("b".repeat(64));
    let r = post_recording(&cp, &token, id, &other, None).await;
    assert_eq!(r.status(), 409);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:detour:problem:recording-conflict");
    let got: Value = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = got["recordings"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{got}");
    assert_eq!(list[0]["sha256"], sha);
    // Bad bodies: every problem at once, a 422 problem.
    let r = post_recording(
        &cp,
        &token,
        id,
        &json!({"bucket": "No_Such", "key": "", "size": -1, "sha256": "xyz"}),
        None,
    )
    .await;
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["bucket", "key", "size", "sha256"], "{p}");
    // Unknown calls and other PoPs' calls are 404.
    assert_eq!(
        post_recording(&cp, &token, "nope", &rec, None).await.status(),
        404
    );
    let del = cp.token("del").await;
    assert_eq!(post_recording(&cp, &del, id, &rec, None).await.status(), 404);
    cp.stop().await;
    db.finish().await;
}

async fn events_build_a_consistent_record_in_any_order(backend: Backend) {
    let Some(db) = db(backend, "events_record").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    cp.put_route("all", json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .await;
    let token = cp.token("blr").await;
    let call: Value = cp
        .post_call(&token, &call_body(), None)
        .await
        .json()
        .await
        .unwrap();
    let id = call["call_id"].as_str().unwrap();
    // Event times an hour ago: late, as after an outage, and valid.
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);

    // Out of order: completed first.
    let r = post_event(&cp, &token, id, json!({"event": "completed", "at": at(t0, 65)})).await;
    assert_eq!(r.status(), 200);
    let rec: Value = r.json().await.unwrap();
    assert_eq!(rec["state"], "completed");
    assert_eq!(rec["duration_seconds"], 0.0);
    post_event(&cp, &token, id, json!({"event": "ringing", "at": at(t0, 0)})).await;
    let r = post_event(&cp, &token, id, json!({"event": "answered", "at": at(t0, 5)})).await;
    let rec: Value = r.json().await.unwrap();
    assert_eq!(rec["state"], "completed");
    assert_eq!(rec["duration_seconds"], 60.0);
    assert_eq!(rec["answered_at"], at_millis(t0, 5));
    // Repeating an event changes nothing.
    let r = post_event(&cp, &token, id, json!({"event": "answered", "at": at(t0, 30)})).await;
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["duration_seconds"], 60.0);
    assert_eq!(again["events"].as_array().unwrap().len(), 3);
    let got: Value = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["state"], "completed");
    assert_eq!(got["duration_seconds"], 60.0);

    // Another PoP's token neither reads nor adds to blr's call: to it the
    // call does not exist. The admin token sees every call.
    let maa = cp.token("maa").await;
    let r = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&maa)
        .send()
        .await
        .unwrap();
    problem(r, 404).await;
    let r = post_event(&cp, &maa, id, json!({"event": "failed"})).await;
    problem(r, 404).await;
    let r = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "completed");

    let r = post_event(&cp, &token, id, json!({"event": "exploded"})).await;
    assert_eq!(problem(r, 422).await["field"], "event");
    let r = post_event(&cp, &token, id, json!({"event": "ringing", "at": "yesterday"})).await;
    assert_eq!(problem(r, 422).await["field"], "at");
    // A broken clock or a forged body: the far past and the future are refused.
    for bad in [
        "1970-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        &at(chrono::Utc::now(), 3600),
    ] {
        let r = post_event(&cp, &token, id, json!({"event": "ringing", "at": bad})).await;
        assert_eq!(problem(r, 422).await["field"], "at", "{bad}");
    }
    let r = post_event(&cp, &token, "no-such-call", json!({"event": "ringing"})).await;
    problem(r, 404).await;

    // Events with an Idempotency-Key replay.
    let call2: Value = cp
        .post_call(&token, &call_body(), None)
        .await
        .json()
        .await
        .unwrap();
    let id2 = call2["call_id"].as_str().unwrap();
    let send = || {
        cp.client
            .post(cp.url(&format!("/v1/calls/{id2}/events")))
            .bearer_auth(&token)
            .header("idempotency-key", "ev-1")
            .json(&json!({"event": "ringing", "at": at(t0, 0)}))
            .send()
    };
    let a = send().await.unwrap();
    assert_eq!(a.status(), 200);
    let a = a.text().await.unwrap();
    let b = send().await.unwrap();
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(b.text().await.unwrap(), a);
    cp.stop().await;
    db.finish().await;
}

async fn routes_admin_is_validated_versioned_and_audited(backend: Backend) {
    let Some(db) = db(backend, "routes_admin").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let r = cp
        .put_route(
            "blr",
            json!({"prefix": "+9180", "trunk": "blr-carrier-1", "pop": "blr"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v1: Value = r.json().await.unwrap();
    assert_eq!(v1["revision"], 1);
    let r = cp
        .client
        .put(cp.url("/v1/routes/blr"))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-detour-actor", "asha")
        .json(
            &json!({"prefix": "+9180", "pop": "blr", "failover": ["maa-carrier-1"],
                      "trunks": [{"name": "blr-carrier-1", "weight": 3}, {"name": "blr-carrier-2"}],
                      "window": {"start": "08:00", "end": "20:00", "days": ["mon", "tue"]}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["revision"], 2);
    assert!(v2["route_version"].as_i64() > v1["route_version"].as_i64());
    assert_eq!(v2["updated_by"], "admin:asha");

    let r = cp
        .put_route(
            "blr-dup",
            json!({"prefix": "+9180", "pop": "blr", "trunk": "x",
        "window": {"start": "08:00", "end": "20:00", "days": ["mon", "tue"]}}),
        )
        .await;
    let p = problem(r, 409).await;
    assert!(p["detail"].as_str().unwrap().contains("blr"), "{p}");

    let r = cp
        .put_route(
            "bad",
            json!({"prefix": "+91", "trunk": "t", "pop": "blr", "priority": "vip"}),
        )
        .await;
    assert_eq!(problem(r, 422).await["field"], "priority");
    let r = cp
        .put_route(
            "bad",
            json!({"prefix": "+91", "trunk": "t", "pop": "blr", "colour": "red"}),
        )
        .await;
    assert_eq!(problem(r, 422).await["field"], "colour");
    let r = cp.put_route("bad", json!({"prefix": "+91", "pop": "blr"})).await;
    assert_eq!(problem(r, 422).await["field"], "trunk");

    let list: Value = cp
        .client
        .get(cp.url("/v1/routes"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["routes"].as_array().unwrap().len(), 1);
    assert_eq!(list["route_version"], v2["route_version"]);
    let one: Value = cp
        .client
        .get(cp.url("/v1/routes/blr"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["trunks"][0]["weight"], 3);

    let r = cp
        .client
        .delete(cp.url("/v1/routes/blr"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = cp
        .client
        .delete(cp.url("/v1/routes/blr"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    problem(r, 404).await;
    let r = cp
        .client
        .get(cp.url("/v1/routes/blr"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    problem(r, 404).await;

    let audit: Value = cp
        .client
        .get(cp.url("/v1/audit"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["delete", "update", "create"]);
    assert_eq!(entries[1]["actor"], "admin:asha");
    assert_eq!(entries[1]["before"]["trunk"], "blr-carrier-1");
    assert_eq!(entries[1]["after"]["trunks"][1]["name"], "blr-carrier-2");
    assert_eq!(entries[0]["after"], Value::Null);
    cp.stop().await;
    db.finish().await;
}

/// A routing hook on loopback whose behaviour a test switches.
struct HookServer {
    url: String,
    mode: Arc<AtomicU32>,
    hits: Arc<AtomicUsize>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

const HOOK_OK: u32 = 0;
const HOOK_SLOW: u32 = 1;
const HOOK_500: u32 = 2;

impl HookServer {
    async fn start() -> HookServer {
        let mode = Arc::new(AtomicU32::new(HOOK_OK));
        let hits = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(Notify::new());
        let (m, h, a) = (mode.clone(), hits.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/route",
            axum::routing::post(move |body: axum::Json<Value>| {
                let (m, h, a) = (m.clone(), h.clone(), a.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    a.notify_one();
                    assert!(body.0["destination"].is_string());
                    match m.load(Ordering::SeqCst) {
                        HOOK_OK => (
                            axum::http::StatusCode::OK,
                            axum::Json(json!({"trunk": "hook-trunk", "pop": "maa"})),
                        ),
                        HOOK_SLOW => {
                            // The hook's own slowness, well past the timeout.
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            (axum::http::StatusCode::OK, axum::Json(json!({"trunk": "late"})))
                        }
                        _ => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            axum::Json(json!({})),
                        ),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/route", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        HookServer {
            url,
            mode,
            hits,
            arrived,
            task,
        }
    }
}

async fn hook_timeout_error_and_breaker_fall_back(backend: Backend) {
    let Some(db) = db(backend, "hook_breaker").await else {
        return;
    };
    let hook = HookServer::start().await;
    let cp = Instance::start(db.config(
        "",
        "[hook]\ntimeout = \"150ms\"\nfailure_threshold = 2\nopen_for = \"400ms\"\n",
    ))
    .await;
    let r = cp
        .put_route(
            "hooked",
            json!({"prefix": "+91", "trunk": "static-trunk", "pop": "blr",
        "failover": ["backup"], "hook": {"url": hook.url, "timeout": "100ms"}}),
        )
        .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let token = cp.token("blr").await;
    let call = || async {
        let r = cp.post_call(&token, &call_body(), None).await;
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()
    };

    let c = call().await;
    assert_eq!(c["fallback"], false);
    assert_eq!(c["route"]["trunk"], "hook-trunk");
    assert_eq!(c["route"]["pop"], "maa");
    assert_eq!(c["route"]["failover"], json!(["static-trunk", "backup"]));

    hook.mode.store(HOOK_SLOW, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let c = call().await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "hook timeout not applied"
    );
    assert_eq!(c["fallback"], true);
    assert_eq!(c["route"]["trunk"], "static-trunk");
    assert!(
        c["fallback_reason"].as_str().unwrap().contains("timed out"),
        "{c}"
    );

    hook.mode.store(HOOK_500, Ordering::SeqCst);
    let c = call().await;
    assert_eq!(c["fallback"], true);
    assert!(c["fallback_reason"].as_str().unwrap().contains("500"), "{c}");
    // Two consecutive failures (timeout, 500) opened the breaker: the hook
    // is not called at all now.
    let hits = hook.hits.load(Ordering::SeqCst);
    let c = call().await;
    assert_eq!(c["fallback"], true);
    assert!(c["fallback_reason"].as_str().unwrap().contains("breaker"), "{c}");
    assert_eq!(
        hook.hits.load(Ordering::SeqCst),
        hits,
        "breaker open: hook skipped"
    );
    // The stored call records the fallback too.
    let id = c["call_id"].as_str().unwrap();
    let got: Value = cp
        .client
        .get(cp.url(&format!("/v1/calls/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["fallback"], true);
    assert!(
        got["fallback_reason"].as_str().unwrap().contains("breaker"),
        "{got}"
    );

    hook.mode.store(HOOK_OK, Ordering::SeqCst);
    wait_until(
        "breaker half-opens and closes",
        Duration::from_secs(5),
        || async { call().await["fallback"] == false },
    )
    .await;
    assert_eq!(call().await["route"]["trunk"], "hook-trunk");
    cp.stop().await;
    hook.task.abort();
    db.finish().await;
}

async fn normal_calls_are_shed_when_saturated_but_emergency_is_not(backend: Backend) {
    let Some(db) = db(backend, "shedding").await else {
        return;
    };
    let hook = HookServer::start().await;
    hook.mode.store(HOOK_SLOW, Ordering::SeqCst);
    let cp = Arc::new(
        Instance::start(db.config(
            "",
            "[limits]\nmax_in_flight = 1\nmax_queue = 0\nqueue_timeout = \"50ms\"\nemergency_reserved = 1\n\
             [hook]\ntimeout = \"2s\"\n",
        ))
        .await,
    );
    cp.put_route(
        "slow",
        json!({"prefix": "+91", "trunk": "t", "pop": "blr",
        "hook": {"url": hook.url, "timeout": "2s"}}),
    )
    .await;
    let token = cp.token("blr").await;
    let arrived = hook.arrived.notified();
    let holder = {
        let (cp, token) = (cp.clone(), token.clone());
        tokio::spawn(async move { cp.post_call(&token, &call_body(), None).await.status().as_u16() })
    };
    // The only normal slot is now held by a call waiting on the slow hook.
    tokio::time::timeout(Duration::from_secs(5), arrived)
        .await
        .expect("hook reached");
    let r = cp.post_call(&token, &call_body(), None).await;
    assert!(r.headers().contains_key("retry-after"));
    let p = problem(r, 503).await;
    assert_eq!(p["type"], "urn:detour:problem:overloaded");
    let r = cp.post_call(&token, &json!({"destination": "112"}), None).await;
    assert_eq!(r.status(), 201, "emergency is never shed");
    assert_eq!(holder.await.unwrap(), 201);
    let text = cp
        .client
        .get(cp.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("detour_cp_shed_total{reason=\"queue_full\"} 1"),
        "{text}"
    );
    let cp = Arc::into_inner(cp).expect("holder done");
    cp.stop().await;
    hook.task.abort();
    db.finish().await;
}

async fn fleet_reports_latest_per_pop(backend: Backend) {
    let Some(db) = db(backend, "fleet").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let blr = cp.token("blr").await;
    let maa = cp.token("maa").await;
    for (pop, token, active) in [
        ("blr", &blr, "direct"),
        ("maa", &maa, "direct"),
        ("blr", &blr, "via:maa"),
    ] {
        let report = detour_wire::AgentReport {
            pop: pop.into(),
            version: "0.1.0".into(),
            active_path: Some(active.into()),
            paths: vec![detour_wire::PathReport {
                path: active.into(),
                endpoint: None,
                state: detour_wire::PathState::Up,
                rtt_seconds: Some(0.012),
                rtt_p95_seconds: None,
                loss_ratio: 0.0,
                score: 1.0,
                active: true,
                consecutive_failures: 0,
                reason: None,
            }],
            config_error: None,
            recordings: None,
            deferred: None,
            switches: Vec::new(),
            relay_rejected: Default::default(),
        };
        let r = cp
            .client
            .post(cp.url(&format!("/v1/agents/{pop}/report")))
            .bearer_auth(token)
            .json(&report)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = cp
        .client
        .post(cp.url("/v1/agents/blr/report"))
        .bearer_auth(&blr)
        .json(&json!({"pop": "blr"}))
        .send()
        .await
        .unwrap();
    problem(r, 422).await;
    let fleet: Value = cp
        .client
        .get(cp.url("/v1/fleet"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pops = fleet["pops"].as_array().unwrap();
    assert_eq!(pops.len(), 2);
    assert_eq!(pops[0]["pop"], "blr");
    assert_eq!(pops[0]["report"]["active_path"], "via:maa");
    let age = pops[0]["age_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    cp.stop().await;
    db.finish().await;
}
