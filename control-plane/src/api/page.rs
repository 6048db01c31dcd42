//! The fleet page for people: `GET /fleet` (the page, embedded in the
//! binary with its script and style: no CDN on a telephony network),
//! `GET|POST /fleet/login` (a form that trades an operator or admin token
//! for a session cookie: HttpOnly, SameSite=Strict, Secure over HTTPS; no
//! token ever in a URL) and `POST /fleet/logout`. The page polls
//! `GET /v1/fleet/view` every second with that cookie.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::Shared;
use crate::auth::{self, AuthError, Principal};
use crate::store;

/// The session cookie's name.
pub const COOKIE: &str = "detour_session";

const PAGE: &str = include_str!("../../assets/fleet.html");
const LOGIN: &str = include_str!("../../assets/login.html");
const SCRIPT: &str = include_str!("../../assets/fleet.js");
const STYLE: &str = include_str!("../../assets/fleet.css");

/// Only this origin's script and style, no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The value of the session cookie, if the request carries one.
pub(super) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: under it browsers send `Origin: null` with the
    // login form, which [`same_origin`] could not tell from another site's.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    r
}

fn see_other(to: &'static str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let note = if message.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(message))
    };
    html(status, LOGIN.replace("<!--message-->", &note))
}

/// HTML-escapes text for an element's content.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[utoipa::path(get, path = "/fleet", tag = "fleet page",
    responses((status = 200, description = "The fleet page (needs the session cookie of a login).", content_type = "text/html"),
              (status = 303, description = "Not logged in: to /fleet/login.")))]
pub(super) async fn page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let Some(id) = session_cookie(&headers) else {
        return see_other("/fleet/login");
    };
    match app.auth.session(id).await {
        Ok(_) => html(StatusCode::OK, PAGE.to_owned()),
        Err(AuthError::Store(e)) => super::ApiError::from(e).into_response(),
        Err(_) => see_other("/fleet/login"),
    }
}

#[utoipa::path(get, path = "/fleet/login", tag = "fleet page",
    responses((status = 200, description = "The login form.", content_type = "text/html")))]
pub(super) async fn login_form() -> Response {
    login_page(StatusCode::OK, "")
}

/// The login form's fields.
#[derive(Deserialize, utoipa::ToSchema)]
pub(super) struct LoginForm {
    /// An operator token (`token create --operator NAME`) or the admin token.
    token: String,
}

#[utoipa::path(post, path = "/fleet/login", tag = "fleet page",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Logged in: the session cookie is set; to /fleet."),
              (status = 400, description = "The form is not `token=…`.", content_type = "text/html"),
              (status = 401, description = "Unknown token.", content_type = "text/html"),
              (status = 403, description = "An agent token, or a form from another site.", content_type = "text/html"),
              (status = 503, description = "The database is unavailable; try again.", content_type = "text/html")))]
pub(super) async fn login(
    State(app): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if !same_origin(&headers, &uri) {
        return login_page(
            StatusCode::FORBIDDEN,
            "This form may only be sent from this page.",
        );
    }
    let Ok(Form(form)) = form else {
        return login_page(StatusCode::BAD_REQUEST, "Send the form with a token.");
    };
    let who = match app.auth.token(&form.token).await {
        Ok(Principal::Admin) => "admin".to_owned(),
        Ok(p @ Principal::Operator { .. }) => p.name(),
        Ok(Principal::Agent { .. }) => {
            return login_page(
                StatusCode::FORBIDDEN,
                "That is an agent token. Use an operator token: detour-control-plane token create --operator NAME.",
            );
        }
        Err(AuthError::Store(_)) => {
            return login_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again in a moment.",
            );
        }
        Err(_) => return login_page(StatusCode::UNAUTHORIZED, "Unknown token."),
    };
    let id = auth::new_session_id();
    let lifetime = app.config.fleet.session_lifetime;
    let expires = store::now_ms() + lifetime.as_millis() as i64;
    let token_hash = auth::hash_token(form.token.trim());
    if app
        .store
        .create_session(&auth::hash_token(&id), &token_hash, &who, expires)
        .await
        .is_err()
    {
        return login_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is unavailable; try again in a moment.",
        );
    }
    tracing::info!(%who, "fleet page login");
    let secure = if app.config.tls.is_some() { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        lifetime.as_secs()
    );
    let mut r = see_other("/fleet");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A form posted from another site is refused: browsers send `Origin` on
/// a POST, and it must name this host (the one the browser asked: `Host`,
/// or HTTP/2's `:authority`).
fn same_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

#[utoipa::path(post, path = "/fleet/logout", tag = "fleet page",
    responses((status = 303, description = "The session is ended and the cookie cleared; to /fleet/login.")))]
pub(super) async fn logout(State(app): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        let _ = app.store.delete_session(&auth::hash_token(id)).await;
    }
    let mut r = see_other("/fleet/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("detour_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    r
}

/// The page's script and style (no secrets: served without a login).
pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Checked again on every load, so an upgraded control plane's page never
    // runs last version's script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; detour_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("xdetour_session=abc"));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn a_form_from_another_origin_is_refused() {
        let path = Uri::from_static("/fleet/login");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("cp.example:8000"));
        assert!(same_origin(&h, &path));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://cp.example:8000"),
        );
        assert!(same_origin(&h, &path));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!same_origin(&h, &path));
        // HTTP/2: no Host, the authority is in the URI.
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://cp.example:8000"),
        );
        assert!(same_origin(
            &h,
            &Uri::from_static("https://cp.example:8000/fleet/login")
        ));
        assert!(!same_origin(&h, &path));
    }

    #[test]
    fn messages_are_escaped() {
        assert_eq!(escape("<b>&\""), "&lt;b&gt;&amp;&quot;");
    }
}
