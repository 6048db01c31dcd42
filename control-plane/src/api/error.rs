//! API errors: every error answer is an `application/problem+json` body
//! (RFC 9457), with `Retry-After` where retrying later helps.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use detour_wire::{PROBLEM_JSON, Problem};

use crate::auth::AuthError;
use crate::intake::FieldError;
use crate::store::StoreError;

/// An error answer: a problem body and, for overload, a retry hint.
#[derive(Debug)]
pub struct ApiError {
    problem: Problem,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &str, title: &str, detail: impl Into<String>) -> Self {
        ApiError {
            problem: Problem::new(status.as_u16(), title, detail)
                .with_type(format!("urn:detour:problem:{code}")),
            retry_after: None,
        }
    }

    pub(super) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub(super) fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.problem = self.problem.with(key, value);
        self
    }

    pub(super) fn invalid(errors: Vec<FieldError>) -> Self {
        let first = errors.first().cloned().unwrap_or(FieldError {
            field: String::new(),
            reason: "is invalid".into(),
        });
        let detail = errors
            .iter()
            .map(|e| {
                if e.field.is_empty() {
                    e.reason.clone()
                } else {
                    format!("{} {}", e.field, e.reason)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            detail,
        )
        .with("field", &first.field)
        .with("errors", &errors)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.problem.to_json()).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "Database unavailable",
                format!("nothing was stored; retry later ({why})"),
            )
            .retry_after(1),
            StoreError::Conflict(why) => ApiError::new(StatusCode::CONFLICT, "conflict", "Conflict", why),
            StoreError::Other(why) => {
                tracing::error!(error = %why, "database error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the database rejected the operation; see the control-plane log",
                )
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(s) => s.into(),
            AuthError::ReadOnly => forbidden(AuthError::ReadOnly.to_string()),
            other => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                other.to_string(),
            ),
        }
    }
}

pub(super) type ApiResult = Result<Response, ApiError>;

pub(super) fn forbidden(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

/// An Idempotency-Key sent again with another body or endpoint.
pub(super) fn mismatch() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was used with a different request body or endpoint; \
         use a new key for a new request",
    )
    .with("field", "Idempotency-Key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_problem_json_with_retry_after() {
        let r = ApiError::from(StoreError::Unavailable("down".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
