//! The API contract: the schemas of every request and response body, for the
//! OpenAPI document served at `/openapi.json`. The handlers in [`crate::api`]
//! carry their own `#[utoipa::path]` (method, path, parameters, statuses);
//! these types only describe the JSON the handlers read and write. CI runs
//! schemathesis against a live control plane with this document, so a body
//! that drifts from its schema fails there. The agent's report is the wire
//! type itself (`detour-wire`'s `openapi` feature), so it cannot drift.

#![allow(dead_code)] // Read by the schema derive, never built.

use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

/// An RFC 9457 problem: every error the control plane answers.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemSchema {
    /// A URI naming the problem type (`urn:detour:problem:…`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
    /// For validation errors: the first field at fault.
    pub field: Option<String>,
    /// For validation errors: every field at fault and why.
    pub errors: Option<Vec<FieldErrorSchema>>,
}

/// One field that failed validation.
#[derive(Serialize, ToSchema)]
#[schema(as = FieldError)]
pub struct FieldErrorSchema {
    pub field: String,
    pub reason: String,
}

/// The errors any API endpoint may answer, each as problem+json.
#[derive(IntoResponses)]
pub enum Errors {
    /// The body is not JSON, or the query string is malformed.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemSchema),
    /// No bearer token, or one the control plane does not know.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(ProblemSchema),
    /// The token may not do this (an agent token on an admin endpoint, or on
    /// another PoP's call or report).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(ProblemSchema),
    /// No such call or route.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemSchema),
    /// The Idempotency-Key was used before with a different request.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(ProblemSchema),
    /// The body is over `limits.max_body_bytes`.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(ProblemSchema),
    /// The body is JSON but not a valid request: `errors` lists each field.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(ProblemSchema),
    /// Over the PoP's rate limit; see `Retry-After`.
    #[response(status = 429, content_type = "application/problem+json")]
    TooMany(ProblemSchema),
    /// Shed under load, or the database is unavailable; see `Retry-After`.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(ProblemSchema),
}

/// `POST /v1/calls`: a call to route.
#[derive(Serialize, ToSchema)]
#[schema(as = CallRequest)]
pub struct CallRequestSchema {
    /// The calling number (E.164, or national with `numbers.default_region`).
    #[schema(example = "+919876543210", max_length = 32)]
    pub caller: Option<String>,
    /// The dialled number; emergency short codes (`112`) as dialled.
    #[schema(example = "08041234567", max_length = 32)]
    pub destination: String,
    /// `outbound` by default; lowercase letters, digits, `_` or `-`.
    #[schema(example = "outbound", pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub call_type: Option<String>,
    /// `normal` by default; emergency destinations are emergency whatever this says.
    pub priority: Option<PrioritySchema>,
    /// Free-form JSON object stored with the call.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Priority)]
#[serde(rename_all = "lowercase")]
pub enum PrioritySchema {
    Normal,
    Emergency,
}

/// Where a call goes.
#[derive(Serialize, ToSchema)]
#[schema(as = RouteDecision)]
pub struct DecisionSchema {
    /// The rule that matched.
    pub rule: String,
    pub trunk: String,
    pub pop: String,
    /// Trunks to try next, in order.
    pub failover: Vec<String>,
}

/// `201` of `POST /v1/calls`: the routing decision.
#[derive(Serialize, ToSchema)]
#[schema(as = CallCreated)]
pub struct CallCreatedSchema {
    pub call_id: String,
    pub caller: Option<String>,
    /// E.164, or the emergency code as dialled.
    pub destination: String,
    pub call_type: String,
    pub priority: PrioritySchema,
    pub route: Option<DecisionSchema>,
    /// The rule's static choice was used because its hook failed.
    pub fallback: bool,
    pub fallback_reason: Option<String>,
    pub route_version: i64,
    /// RFC 3339.
    pub created_at: String,
}

/// One event of a call.
#[derive(Serialize, ToSchema)]
#[schema(as = CallEvent)]
pub struct CallEventSchema {
    pub event: EventKindSchema,
    /// RFC 3339.
    pub at: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = EventKind)]
#[serde(rename_all = "lowercase")]
pub enum EventKindSchema {
    Ringing,
    Answered,
    Completed,
    Failed,
}

/// `POST /v1/calls/{id}/events`.
#[derive(Serialize, ToSchema)]
#[schema(as = EventRequest)]
pub struct EventRequestSchema {
    pub event: EventKindSchema,
    /// RFC 3339; within the last 30 days and at most 10 minutes ahead.
    /// Default: when received.
    #[schema(format = DateTime)]
    pub at: Option<String>,
}

/// An object in the recordings bucket, reported by the agent that uploaded it.
#[derive(Serialize, ToSchema)]
#[schema(as = RecordingRequest)]
pub struct RecordingRequestSchema {
    /// S3 bucket name.
    pub bucket: String,
    /// Object key, 1 to 1024 bytes.
    pub key: String,
    /// Bytes, 0 to 5 TiB.
    pub size: i64,
    /// SHA-256 of the object, 64 hex digits.
    pub sha256: String,
    /// Length of the recording, 0 to 86400.
    pub duration_seconds: Option<f64>,
    pub content_type: Option<String>,
}

/// A recording of a call.
#[derive(Serialize, ToSchema)]
#[schema(as = Recording)]
pub struct RecordingSchema {
    pub bucket: String,
    pub key: String,
    pub size: i64,
    pub sha256: String,
    pub duration_seconds: Option<f64>,
    pub content_type: Option<String>,
}

/// A call and what its events say.
#[derive(Serialize, ToSchema)]
#[schema(as = CallRecord)]
pub struct CallRecordSchema {
    pub call_id: String,
    pub created_at: String,
    pub pop: String,
    pub caller: Option<String>,
    pub destination: String,
    pub call_type: String,
    pub priority: PrioritySchema,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub route: Option<DecisionSchema>,
    pub fallback: bool,
    pub fallback_reason: Option<String>,
    /// `initiated`, `ringing`, `answered`, `completed` or `failed`.
    pub state: String,
    pub ringing_at: Option<String>,
    pub answered_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<f64>,
    pub events: Vec<CallEventSchema>,
    pub recordings: Vec<RecordingSchema>,
}

/// A trunk and its share of calls.
#[derive(Serialize, ToSchema)]
#[schema(as = WeightedTrunk)]
pub struct WeightedTrunkSchema {
    pub name: String,
    /// Relative share; 0 keeps the trunk for failover only. Default 1.
    pub weight: Option<u32>,
}

/// A local time-of-day window.
#[derive(Serialize, ToSchema)]
#[schema(as = Window)]
pub struct WindowSchema {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
    /// `mon` … `sun`; empty: every day.
    pub days: Option<Vec<String>>,
}

/// An external routing hook.
#[derive(Serialize, ToSchema)]
#[schema(as = Hook)]
pub struct HookSchema {
    /// `http://` or `https://`.
    pub url: String,
    /// e.g. `150ms`.
    pub timeout: Option<String>,
}

/// `PUT /v1/routes/{name}`: a routing rule.
#[derive(Serialize, ToSchema)]
#[schema(as = RouteSpec)]
pub struct RouteSpecSchema {
    /// `+` and digits, digits only (short codes), or empty (everything).
    #[schema(example = "+9180", pattern = "^\\+?[0-9]{0,15}$")]
    pub prefix: String,
    #[schema(example = "blr-carrier-1", pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub trunk: Option<String>,
    pub trunks: Option<Vec<WeightedTrunkSchema>>,
    #[schema(example = "blr", pattern = "^[A-Za-z0-9._-]{1,32}$")]
    pub pop: String,
    pub failover: Option<Vec<String>>,
    pub call_type: Option<String>,
    pub priority: Option<PrioritySchema>,
    pub window: Option<WindowSchema>,
    pub hook: Option<HookSchema>,
}

/// A stored route: its spec and its history.
#[derive(Serialize, ToSchema)]
#[schema(as = Route)]
pub struct RouteSchema {
    #[serde(flatten)]
    pub spec: RouteSpecSchema,
    pub name: String,
    pub revision: i64,
    pub route_version: i64,
    pub updated_at: String,
    pub updated_by: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = RouteList)]
pub struct RouteListSchema {
    pub route_version: i64,
    pub routes: Vec<RouteSchema>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub struct AuditEntrySchema {
    pub at: String,
    pub actor: String,
    pub request_id: Option<String>,
    /// `put` or `delete`.
    pub action: String,
    pub name: String,
    pub route_version: i64,
    #[schema(value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = AuditLog)]
pub struct AuditLogSchema {
    pub entries: Vec<AuditEntrySchema>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = ReportStored)]
pub struct ReportStoredSchema {
    /// `stored`.
    pub status: String,
    pub pop: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = FleetPop)]
pub struct FleetPopSchema {
    pub pop: String,
    pub received_at: String,
    pub age_seconds: f64,
    pub report: detour_wire::AgentReport,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Fleet)]
pub struct FleetSchema {
    pub generated_at: String,
    pub pops: Vec<FleetPopSchema>,
}

/// `GET /v1/fleet/view`: what the fleet page shows.
#[derive(Serialize, ToSchema)]
#[schema(as = FleetView)]
pub struct FleetViewSchema {
    /// When the view was built, ms since the epoch.
    pub now_ms: i64,
    /// `fleet.stale_after`, seconds.
    pub stale_after_s: f64,
    /// Width of one history point, seconds (30).
    pub bucket_s: i64,
    /// Length of the history, seconds (900).
    pub window_s: i64,
    pub summary: FleetSummarySchema,
    /// Every PoP that ever reported, those needing a look first.
    pub pops: Vec<FleetViewPopSchema>,
    /// PoPs whose active path goes through a peer.
    pub detours: Vec<DetourSchema>,
    /// The newest switches of active paths, newest first.
    pub switches: Vec<FleetEventSchema>,
    /// The newest relay refusals, newest first.
    pub refusals: Vec<FleetEventSchema>,
}

/// How many PoPs are in which condition.
#[derive(Serialize, ToSchema)]
#[schema(as = FleetSummary)]
pub struct FleetSummarySchema {
    pub pops: u64,
    pub direct: u64,
    pub detoured: u64,
    pub stale: u64,
    pub no_path: u64,
}

/// One PoP on the fleet page.
#[derive(Serialize, ToSchema)]
#[schema(as = FleetViewPop)]
pub struct FleetViewPopSchema {
    pub pop: String,
    pub received_at_ms: i64,
    /// Seconds since its last report.
    pub age_s: f64,
    /// No report for `fleet.stale_after`.
    pub stale: bool,
    pub version: Option<String>,
    /// Its active path (`direct`, `via:<peer>`).
    pub active: Option<String>,
    pub config_error: Option<String>,
    pub last_switch: Option<detour_wire::SwitchReport>,
    pub paths: Vec<FleetViewPathSchema>,
}

/// One path of a PoP, now and over the last 15 minutes.
#[derive(Serialize, ToSchema)]
#[schema(as = FleetViewPath)]
pub struct FleetViewPathSchema {
    pub path: String,
    pub state: detour_wire::PathState,
    pub active: bool,
    pub rtt_ms: Option<f64>,
    /// 0.0 to 1.0.
    pub loss: f64,
    pub reason: Option<String>,
    pub history: PathHistorySchema,
}

/// One value per 30-second bucket, oldest first; null where no report came.
#[derive(Serialize, ToSchema)]
#[schema(as = PathHistory)]
pub struct PathHistorySchema {
    /// The highest RTT reported in each bucket, ms.
    pub rtt_ms: Vec<Option<f64>>,
    /// The highest loss reported in each bucket.
    pub loss: Vec<Option<f64>>,
    /// The worst state of each bucket: `u` up, `g` degraded, `d` down, `-` none.
    pub state: String,
}

/// A PoP going through a peer.
#[derive(Serialize, ToSchema)]
#[schema(as = Detour)]
pub struct DetourSchema {
    pub from: String,
    pub via: String,
    /// The PoP has stopped reporting: this was its last known path.
    pub stale: bool,
}

/// A switch (`from`, `to`, `reason`) or a relay refusal (`reason`, `n`).
#[derive(Serialize, ToSchema)]
#[schema(as = FleetEvent)]
pub struct FleetEventSchema {
    /// ms since the epoch.
    pub at_ms: i64,
    pub pop: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
    /// Refusals counted (1 for a switch).
    pub n: i64,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Ready)]
pub struct ReadySchema {
    /// `ready`.
    pub status: String,
    pub route_version: i64,
}
