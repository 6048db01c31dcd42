//! The fleet page and its data over real sockets, on SQLite and Postgres:
//! who may read it (an operator token, a login's cookie; 401 without, a
//! redirect to the login for the page), and the history that reports leave
//! in the database (switches once each, relay refusals as counts between
//! reports, per-path samples, staleness, bounds). The page in a real
//! browser is tests/tests/fleet_page.rs in the lab.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use detour_wire::{AgentReport, PathReport, PathState, SwitchReport};
use serde_json::Value;
use support::{ADMIN_TOKEN, Backend, Db, Instance, problem, wait_until};

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
    the_page_and_its_data_need_an_operator_login,
    reports_leave_a_bounded_history,
    a_silent_pop_turns_stale,
);

/// A client that does not follow redirects, so a 303 can be seen.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn path(name: &str, state: PathState, active: bool, rtt: f64) -> PathReport {
    PathReport {
        path: name.into(),
        endpoint: None,
        state,
        rtt_seconds: Some(rtt),
        rtt_p95_seconds: None,
        loss_ratio: if state == PathState::Down { 1.0 } else { 0.0 },
        score: 1.0,
        active,
        consecutive_failures: 0,
        reason: (state == PathState::Down).then(|| "3 consecutive failures (timeout)".into()),
    }
}

fn report(pop: &str, active: &str, switches: Vec<SwitchReport>, refused: u64) -> AgentReport {
    let direct_up = active == "direct";
    AgentReport {
        pop: pop.into(),
        version: "0.1.0".into(),
        active_path: Some(active.into()),
        paths: vec![
            path(
                "direct",
                if direct_up { PathState::Up } else { PathState::Down },
                direct_up,
                0.012,
            ),
            path("via:maa", PathState::Up, !direct_up, 0.020),
        ],
        config_error: None,
        recordings: None,
        deferred: None,
        switches,
        relay_rejected: if refused > 0 {
            BTreeMap::from([("untrusted_cert".to_owned(), refused)])
        } else {
            BTreeMap::new()
        },
    }
}

async fn send_report(cp: &Instance, token: &str, r: &AgentReport) {
    let resp = cp
        .client
        .post(cp.url(&format!("/v1/agents/{}/report", r.pop)))
        .bearer_auth(token)
        .json(r)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
}

async fn view(cp: &Instance, token: &str) -> Value {
    let r = cp
        .client
        .get(cp.url("/v1/fleet/view"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn the_page_and_its_data_need_an_operator_login(backend: Backend) {
    let Some(db) = Db::new(backend, "fleet_login").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let c = client();
    let (operator, operator_id) = detour_control_plane::create_operator_token(&cp.config, "noc")
        .await
        .unwrap();
    assert!(operator.starts_with("dto_noc_"));
    let agent = cp.token("blr").await;

    // Nothing: 401 for the data, the login for the page.
    problem(c.get(cp.url("/v1/fleet/view")).send().await.unwrap(), 401).await;
    problem(c.get(cp.url("/v1/fleet")).send().await.unwrap(), 401).await;
    let r = c.get(cp.url("/fleet")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/fleet/login");
    let r = c.get(cp.url("/fleet/login")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(r.text().await.unwrap().contains("name=\"token\""));
    // A forged cookie is no login.
    let r = c
        .get(cp.url("/fleet"))
        .header("cookie", format!("detour_session={}", "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);

    // An agent's token reads no fleet and cannot log in.
    problem(
        c.get(cp.url("/v1/fleet/view"))
            .bearer_auth(&agent)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    let r = c
        .post(cp.url("/fleet/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", agent.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    let r = c
        .post(cp.url("/fleet/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", "dto_noc_wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // An operator token reads the fleet and nothing else.
    let r = c
        .get(cp.url("/v1/fleet/view"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(cp.url("/v1/fleet"))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    problem(
        c.get(cp.url("/v1/routes"))
            .bearer_auth(&operator)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    problem(
        c.get(cp.url("/v1/audit"))
            .bearer_auth(&operator)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    let body = serde_json::json!({"caller": "+919876543210", "destination": "08041234567"});
    problem(cp.post_call(&operator, &body, None).await, 403).await;
    let r = c
        .post(cp.url("/v1/agents/blr/report"))
        .bearer_auth(&operator)
        .json(&report("blr", "direct", vec![], 0))
        .send()
        .await
        .unwrap();
    problem(r, 403).await;

    // The login form: a cookie that JavaScript cannot read and other sites
    // do not send, and no token in any URL.
    let r = c
        .post(cp.url("/fleet/login"))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", operator.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(cp.url("/fleet/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", operator.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/fleet");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(
        !set.contains(&operator),
        "the cookie holds a session id, not the token: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let r = c
        .get(cp.url("/fleet"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    assert!(
        page.contains("/fleet/fleet.js") && !page.contains("http"),
        "no external assets"
    );
    let r = c
        .get(cp.url("/v1/fleet/view"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for asset in ["/fleet/fleet.js", "/fleet/fleet.css"] {
        let r = c.get(cp.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }
    // The cookie is for the fleet reads only: no mutation takes it.
    let r = c
        .put(cp.url("/v1/routes/x"))
        .header("cookie", &cookie)
        .json(&serde_json::json!({"prefix": "+91", "trunk": "t", "pop": "blr"}))
        .send()
        .await
        .unwrap();
    problem(r, 401).await;

    // Logging out ends the session on the server, not just in the browser.
    let r = c
        .post(cp.url("/fleet/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    problem(
        c.get(cp.url("/v1/fleet/view"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;

    // Revoking the operator token ends its sessions too.
    let r = c
        .post(cp.url("/fleet/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", operator.as_str()))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = c
        .get(cp.url("/v1/fleet/view"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let who = detour_control_plane::revoke_agent_token(&cp.config, &operator_id)
        .await
        .unwrap();
    assert_eq!(who, "operator:noc");
    problem(
        c.get(cp.url("/v1/fleet/view"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;

    // The admin token may log in too.
    let r = c
        .post(cp.url("/fleet/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    cp.stop().await;
    db.finish().await;
}

async fn reports_leave_a_bounded_history(backend: Backend) {
    let Some(db) = Db::new(backend, "fleet_history").await else {
        return;
    };
    let cp = Instance::start(db.config("", "")).await;
    let blr = cp.token("blr").await;
    let maa = cp.token("maa").await;
    send_report(&cp, &maa, &report("maa", "direct", vec![], 0)).await;
    send_report(&cp, &blr, &report("blr", "direct", vec![], 0)).await;
    let switch = SwitchReport {
        at_ms: detour_control_plane::store::now_ms(),
        from: "direct".into(),
        to: "via:maa".into(),
        reason: "direct down: 3 consecutive failures (timeout)".into(),
    };
    // The agent repeats its recent switches in every report and counts
    // refusals since it started.
    send_report(&cp, &blr, &report("blr", "via:maa", vec![switch.clone()], 3)).await;
    send_report(&cp, &blr, &report("blr", "via:maa", vec![switch.clone()], 5)).await;

    let v = view(&cp, ADMIN_TOKEN).await;
    // Browsers get it gzipped (a tenth of the size at 1,000 PoPs).
    let r = cp
        .client
        .get(cp.url("/v1/fleet/view"))
        .bearer_auth(ADMIN_TOKEN)
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&r.bytes().await.unwrap()[..]),
        &mut text,
    )
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["summary"],
        v["summary"]
    );
    assert_eq!(v["summary"]["detoured"], 1);
    assert_eq!(v["summary"]["direct"], 1);
    assert_eq!(v["detours"][0]["from"], "blr");
    assert_eq!(v["detours"][0]["via"], "maa");
    let blr_view = v["pops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pop"] == "blr")
        .unwrap();
    assert_eq!(blr_view["active"], "via:maa");
    let states = blr_view["paths"][0]["history"]["state"].as_str().unwrap();
    // The worst state of the bucket: the down direct path shows.
    assert!(states.ends_with('d'), "{states}");
    let rtts = blr_view["paths"][1]["history"]["rtt_ms"].as_array().unwrap();
    assert_eq!(rtts.last().unwrap(), 20.0);
    let switches = v["switches"].as_array().unwrap();
    assert_eq!(
        switches.len(),
        1,
        "one switch, however often it is repeated: {switches:?}"
    );
    assert_eq!(switches[0]["reason"], switch.reason);
    assert_eq!(switches[0]["to"], "via:maa");
    let refused: Vec<i64> = v["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["n"].as_i64().unwrap())
        .collect();
    assert_eq!(refused.iter().sum::<i64>(), 5, "3, then 2 more: {refused:?}");

    // A later report in the same bucket raises its point (the worst of the
    // bucket), seen by the next build of the view.
    let mut slower = report("blr", "via:maa", vec![switch.clone()], 5);
    slower.paths[1].rtt_seconds = Some(0.050);
    send_report(&cp, &blr, &slower).await;
    wait_until("the view's next build", Duration::from_secs(5), || async {
        let v = view(&cp, ADMIN_TOKEN).await;
        let blr_view = v["pops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pop"] == "blr")
            .cloned();
        let rtts = blr_view.unwrap()["paths"][1]["history"]["rtt_ms"].clone();
        rtts.as_array().unwrap().iter().any(|x| *x == 50.0)
    })
    .await;

    // Bounded: at most `max_events` events stay, and old samples go.
    let store = cp.store().await;
    let (samples, events) = store.fleet_history_size().await.unwrap();
    // Two paths of two PoPs (a bucket boundary between reports adds some).
    assert!(samples >= 4, "{samples}");
    assert_eq!(events, 3);
    store.purge_fleet(i64::MIN, i64::MIN, 1).await.unwrap();
    assert_eq!(store.fleet_history_size().await.unwrap().1, 1);
    store.purge_fleet(i64::MAX, i64::MIN, 100).await.unwrap();
    assert_eq!(store.fleet_history_size().await.unwrap().0, 0);
    store.close().await;
    cp.stop().await;
    db.finish().await;
}

async fn a_silent_pop_turns_stale(backend: Backend) {
    let Some(db) = Db::new(backend, "fleet_stale").await else {
        return;
    };
    let cp = Instance::start(db.config("", "[fleet]\nstale_after = \"1s\"\n")).await;
    let del = cp.token("del").await;
    send_report(&cp, &del, &report("del", "direct", vec![], 0)).await;
    let v = view(&cp, ADMIN_TOKEN).await;
    assert_eq!(v["pops"][0]["stale"], false);
    wait_until("del shown stale", Duration::from_secs(10), || async {
        let v = view(&cp, ADMIN_TOKEN).await;
        v["pops"][0]["stale"] == true && v["summary"]["stale"] == 1
    })
    .await;
    cp.stop().await;
    db.finish().await;
}
