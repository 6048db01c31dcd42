//! Fleet: `POST /v1/agents/{pop}/report` (an agent's report of its paths,
//! latest per PoP, and what it adds to the history), `GET /v1/fleet` (every
//! PoP's last report) and `GET /v1/fleet/view` (the fleet page's data, built
//! by [`crate::fleet`] at most twice a second per replica). The reads take
//! the admin token, an operator token or a fleet-page session
//! ([`fleet_reader`]).

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use detour_wire::AgentReport;
use serde_json::{Value, json};
use tokio::time::{Duration, Instant};

use super::error::{ApiError, ApiResult, forbidden, mismatch};
use super::shed::rate_limit;
use super::{Shared, idem_of, json_response, read_body, rfc3339, stored_response};
use crate::auth::{AuthError, Principal};
use crate::intake::FieldError;
use crate::openapi;
use crate::store::{self, Outcome, StoredResponse};

#[utoipa::path(post, path = "/v1/agents/{pop}/report", tag = "fleet", security(("bearer" = [])),
    params(("pop" = String, Path, example = "blr", description = "The reporting PoP; its token's PoP."),
           ("Idempotency-Key" = Option<String>, Header, description = "Repeats with this key get the first answer.")),
    request_body = detour_wire::AgentReport,
    responses((status = 200, description = "Stored.", body = openapi::ReportStoredSchema), openapi::Errors))]
pub(super) async fn post_report(
    State(app): State<Shared>,
    Path(pop): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let who = app.auth.authenticate(&headers).await?;
    if let Principal::Agent { pop: mine } = &who
        && *mine != pop
    {
        return Err(forbidden(format!(
            "this token belongs to PoP {mine:?} and cannot report for {pop:?}"
        )));
    }
    let bytes = read_body(&app, body).await?;
    let report: AgentReport = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(vec![FieldError {
            field: String::new(),
            reason: format!("the body is not an agent report: {e}"),
        }])
    })?;
    if report.pop != pop {
        return Err(ApiError::invalid(vec![FieldError {
            field: "pop".into(),
            reason: format!("is {:?} but the URL says {pop:?}", report.pop),
        }]));
    }
    rate_limit(&app, &who).await?;
    let path = format!("/v1/agents/{pop}/report");
    let idem = idem_of(&headers, &path, &who, &bytes)?;
    let response = StoredResponse {
        status: 200,
        content_type: "application/json".into(),
        body: json!({"status": "stored", "pop": pop}).to_string(),
    };
    let text = serde_json::to_string(&report).unwrap_or_default();
    let retention = app.config.idempotency.retention;
    match app
        .store
        .put_report(idem.as_ref(), &report, &text, &response, retention)
        .await?
    {
        Outcome::Done(()) => Ok(stored_response(response, false)),
        Outcome::Replay(r) => Ok(stored_response(r, true)),
        Outcome::Mismatch => Err(mismatch()),
    }
}

#[utoipa::path(get, path = "/v1/fleet", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, description = "Every PoP's last report.", body = openapi::FleetSchema), openapi::Errors))]
pub(super) async fn fleet(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    fleet_reader(&app, &headers).await?;
    let now = store::now_ms();
    let rows = app.store.fleet().await?;
    let pops: Vec<Value> = rows
        .iter()
        .map(|(pop, at, report)| {
            json!({
                "pop": pop,
                "received_at": rfc3339(*at),
                "age_seconds": ((now - at).max(0) as f64) / 1000.0,
                "report": serde_json::from_str::<Value>(report).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"generated_at": rfc3339(now), "pops": pops}),
    ))
}

#[utoipa::path(get, path = "/v1/fleet/view", tag = "fleet", security(("bearer" = [])),
    responses((status = 200, description = "The fleet page's data: every PoP's paths with their \
        15-minute history, the detours, recent switches and relay refusals.", body = openapi::FleetViewSchema),
        openapi::Errors))]
pub(super) async fn view(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    fleet_reader(&app, &headers).await?;
    let gzip = accepts_gzip(&headers);
    let body = app.fleet_view.get(&app, gzip).await?;
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(resp)
}

/// Whether the client takes a gzip body (`Accept-Encoding: gzip`, not at
/// `q=0`); every browser does.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let q0 =
                parts.any(|p| p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()) == Some(0.0));
            name.eq_ignore_ascii_case("gzip") && !q0
        })
}

/// Who may read the fleet: the admin token or an operator token in the
/// `Authorization` header, or else a fleet-page session cookie. An agent
/// token is refused (403); nothing at all is a 401.
pub(super) async fn fleet_reader(app: &super::App, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return match app.auth.bearer(headers).await? {
            Principal::Agent { .. } => Err(forbidden(
                "an agent token cannot read the fleet; use an operator token (token create --operator NAME)",
            )),
            p => Ok(p),
        };
    }
    match super::page::session_cookie(headers) {
        Some(id) => Ok(app.auth.session(id).await?),
        None => Err(AuthError::NoSession.into()),
    }
}

/// The view, built at most once per [`ViewCache::FRESH`] on this replica
/// however many pages poll it: one build's queries serve every viewer.
///
/// It also keeps the history samples of closed buckets as read last time:
/// those rows no longer change (a report writes the bucket of the moment it
/// arrives), so a build reads only the last two buckets from the database
/// instead of the whole 15 minutes (a few thousand rows instead of ~90,000
/// for 1,000 PoPs, which took 300 ms on SQLite). The database stays the
/// history's only source: a replica that starts, or has not been asked for
/// a while, reads the window whole again.
#[derive(Default)]
pub struct ViewCache {
    state: tokio::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    built: Option<Built>,
    /// Samples by bucket, for buckets before `complete_until`.
    samples: std::collections::BTreeMap<i64, Vec<store::SampleRow>>,
    /// The first bucket that may still change (is read again).
    complete_until: i64,
}

/// One built view, and its gzip once a client asked for that.
struct Built {
    at: Instant,
    body: Bytes,
    gzip: Option<Bytes>,
}

impl Built {
    fn answer(&mut self, gzip: bool) -> Bytes {
        if !gzip {
            return self.body.clone();
        }
        self.gzip
            .get_or_insert_with(|| {
                use std::io::Write;
                // The fastest level: a tenth of the size at a few ms.
                let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                let _ = z.write_all(&self.body);
                Bytes::from(z.finish().unwrap_or_default())
            })
            .clone()
    }
}

impl ViewCache {
    /// How long a built view is served again. Pages poll every second, so
    /// a report is on screen within about 1.5 s of its arrival.
    pub const FRESH: Duration = Duration::from_millis(500);

    /// The view's body, gzipped when `gzip`.
    async fn get(&self, app: &super::App, gzip: bool) -> Result<Bytes, ApiError> {
        // Held across the build: concurrent requests wait for one build
        // instead of each running its own.
        let mut state = self.state.lock().await;
        if let Some(built) = &mut state.built
            && built.at.elapsed() < Self::FRESH
        {
            return Ok(built.answer(gzip));
        }
        let now = store::now_ms();
        let first = crate::fleet::first_bucket(now);
        let now_bucket = now.div_euclid(store::BUCKET_MS);
        // The bucket before this one may still take a report that was in
        // flight as it closed; read it again too.
        let read_from = state.complete_until.clamp(first, now_bucket - 1);
        let reports = app.store.fleet().await?;
        let fresh = app.store.fleet_samples(read_from).await?;
        let switches = app
            .store
            .fleet_events("switch", crate::fleet::EVENTS_SHOWN)
            .await?;
        let refusals = app
            .store
            .fleet_events("refusal", crate::fleet::EVENTS_SHOWN)
            .await?;
        let mut samples = std::mem::take(&mut state.samples).split_off(&first);
        samples.retain(|&b, _| b < read_from);
        for s in fresh {
            samples.entry(s.bucket).or_default().push(s);
        }
        let all: Vec<&store::SampleRow> = samples.values().flatten().collect();
        let v = crate::fleet::view(&crate::fleet::Inputs {
            now_ms: now,
            stale_after_ms: app.config.fleet.stale_after.as_millis() as i64,
            reports: &reports,
            samples: &all,
            switches: &switches,
            refusals: &refusals,
        });
        let body = Bytes::from(v.to_string());
        state.samples = samples;
        state.complete_until = now_bucket - 1;
        let mut built = Built {
            at: Instant::now(),
            body,
            gzip: None,
        };
        let answer = built.answer(gzip);
        state.built = Some(built);
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_sent_to_whoever_accepts_it() {
        let h = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            h
        };
        assert!(accepts_gzip(&h("gzip, deflate, br, zstd")));
        assert!(accepts_gzip(&h("br;q=1.0, gzip;q=0.8")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
