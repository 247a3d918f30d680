//! The console's request handlers. Each one reads through the API's own functions
//! (`http::pushes`, `http::quotas`) or the store trait, and renders a template.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::chart::{self, HourBar};
use super::i18n::Lang;
use super::session::{self, Session, LANG_COOKIE, SESSION_COOKIE, SIGNIN_COOKIE};
use super::view::{self, PushDetail, PushRow, QueueRow, TimeView};
use super::ConsoleState;
use crate::config::Scope;
use crate::error::ApiError;
use crate::http::auth::Caller;
use crate::http::pushes::{self, ListParams};
use crate::http::quotas;
use crate::store::{DeliveryMode, HourlyCount, PushStatus};

type St = State<Arc<ConsoleState>>;

/// Cast types offered by the history filter.
const CAST_TYPES: [&str; 6] = [
    "unicast",
    "listcast",
    "broadcast",
    "groupcast",
    "filecast",
    "customizedcast",
];
/// Longest token the sign-in form looks at.
const MAX_TOKEN_LEN: usize = 512;

/// What every page's layout needs.
fn base(lang: Lang, session: Option<&Session>, nav: &str, here: &str) -> Map<String, Value> {
    let mut next = url::form_urlencoded::Serializer::new(String::new());
    next.append_pair("next", &session::safe_next(Some(here)));
    let mut m = Map::new();
    m.insert("t".into(), json!(lang.texts()));
    m.insert("lang".into(), json!(lang.code()));
    m.insert("other_lang".into(), json!(lang.other().code()));
    m.insert("other_label".into(), json!(lang.other().label()));
    m.insert(
        "lang_switch".into(),
        json!(format!(
            "/ui/lang/{}?{}",
            lang.other().code(),
            next.finish()
        )),
    );
    m.insert("nav".into(), json!(nav));
    if let Some(s) = session {
        m.insert("client".into(), json!(s.caller.name()));
        m.insert("csrf".into(), json!(s.csrf));
        m.insert(
            "can_cancel".into(),
            json!(s.caller.0.has_scope(Scope::Cancel)),
        );
    }
    m
}

fn here(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/ui/".to_owned(), |p| p.as_str().to_owned())
}

/// An error as a page, with the status the API would answer. 5xx causes are logged only.
fn error_page(state: &ConsoleState, session: &Session, err: ApiError) -> Response {
    if err.status().is_server_error() {
        tracing::error!(error = %err, "console request failed");
    }
    let problem = err.problem();
    let mut ctx = base(session.lang, Some(session), "", "/ui/");
    ctx.insert("message".into(), json!(problem.detail));
    ctx.insert("heading".into(), json!(problem.title));
    state.render(err.status(), "error.html", Value::Object(ctx))
}

/// 403: a form POST without a valid session or CSRF token.
pub fn refused(state: &ConsoleState, lang: Lang, session: Option<&Session>) -> Response {
    let mut ctx = base(lang, session, "", "/ui/");
    ctx.insert("message".into(), json!(lang.t("forbidden")));
    ctx.insert("heading".into(), json!(lang.t("error_title")));
    state.render(StatusCode::FORBIDDEN, "error.html", Value::Object(ctx))
}

pub async fn not_found(State(state): St, headers: HeaderMap) -> Response {
    let lang = Lang::of(&headers);
    let mut ctx = base(lang, None, "", "/ui/");
    ctx.insert("message".into(), json!(lang.t("not_found")));
    ctx.insert("heading".into(), json!(lang.t("error_title")));
    state.render(StatusCode::NOT_FOUND, "error.html", Value::Object(ctx))
}

fn see_other(to: &str, cookies: &[String]) -> Response {
    let mut res = Redirect::to(to).into_response();
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

// ----- sign-in -----

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    bye: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: Option<String>,
    csrf: Option<String>,
    next: Option<String>,
}

fn login_page(
    state: &ConsoleState,
    lang: Lang,
    status: StatusCode,
    nonce: &str,
    next: &str,
    message: Option<(&str, &str)>,
) -> Response {
    let mut ctx = base(
        lang,
        None,
        "login",
        &format!("/ui/login?next={}", urlencode(next)),
    );
    ctx.insert("csrf".into(), json!(state.keys.csrf_for(&signin_id(nonce))));
    ctx.insert("next".into(), json!(next));
    if let Some((kind, text)) = message {
        ctx.insert("message".into(), json!({"kind": kind, "text": text}));
    }
    let mut res = state.render(status, "login.html", Value::Object(ctx));
    if let Ok(v) = HeaderValue::from_str(&session::cookie(state, SIGNIN_COOKIE, nonce, 3600)) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
    res
}

fn signin_id(nonce: &str) -> String {
    format!("signin|{nonce}")
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub async fn show_login(
    State(state): St,
    headers: HeaderMap,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let lang = Lang::of(&headers);
    let q = query.ok().map(|Query(q)| q);
    let next = session::safe_next(q.as_ref().and_then(|q| q.next.as_deref()));
    if session::verify(&state, &headers).is_some() {
        return see_other(&next, &[]);
    }
    let message = if q.as_ref().is_some_and(|q| q.bye.is_some()) {
        Some(("ok", lang.t("signed_out")))
    } else if q.as_ref().is_some_and(|q| q.next.is_some()) {
        Some(("info", lang.t("session_expired")))
    } else {
        None
    };
    let nonce = session::random_id();
    login_page(&state, lang, StatusCode::OK, &nonce, &next, message)
}

pub async fn login(
    State(state): St,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let lang = Lang::of(&headers);
    let Ok(Form(form)) = form else {
        return refused(&state, lang, None);
    };
    let Some(nonce) = session::read_cookie(&headers, SIGNIN_COOKIE).map(str::to_owned) else {
        return refused(&state, lang, None);
    };
    if !state.keys.csrf_ok(&signin_id(&nonce), form.csrf.as_deref()) {
        return refused(&state, lang, None);
    }
    let next = session::safe_next(form.next.as_deref());
    let token = form.token.as_deref().unwrap_or("").trim();
    let caller = if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        None
    } else {
        Caller::from_token(&state.gateway, token)
    };
    let Some(caller) = caller else {
        tracing::info!("console sign-in refused: unknown token");
        return login_page(
            &state,
            lang,
            StatusCode::UNAUTHORIZED,
            &nonce,
            &next,
            Some(("error", lang.t("bad_token"))),
        );
    };
    if !caller.0.has_scope(Scope::Read) {
        return login_page(
            &state,
            lang,
            StatusCode::FORBIDDEN,
            &nonce,
            &next,
            Some(("error", lang.t("no_read_scope"))),
        );
    }
    tracing::info!(client = %caller.name(), "console sign-in");
    see_other(
        &next,
        &[
            session::issue(&state, &caller),
            session::clear(&state, SIGNIN_COOKIE),
        ],
    )
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    csrf: Option<String>,
}

fn csrf_of(form: Result<Form<CsrfForm>, FormRejection>) -> Option<String> {
    form.ok().and_then(|Form(f)| f.csrf)
}

pub async fn logout(
    State(state): St,
    session: Session,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if !session.csrf_ok(&state, csrf_of(form).as_deref()) {
        return refused(&state, session.lang, Some(&session));
    }
    see_other("/ui/login?bye=1", &[session::clear(&state, SESSION_COOKIE)])
}

#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn switch_lang(
    State(state): St,
    headers: HeaderMap,
    Path(code): Path<String>,
    query: Result<Query<NextQuery>, QueryRejection>,
) -> Response {
    let Some(lang) = Lang::parse(&code) else {
        return not_found(State(state), headers).await;
    };
    let next = session::safe_next(query.as_ref().ok().and_then(|q| q.next.as_deref()));
    see_other(
        &next,
        &[session::cookie(
            &state,
            LANG_COOKIE,
            lang.code(),
            365 * 24 * 3600,
        )],
    )
}

// ----- overview -----

pub async fn overview(State(state): St, session: Session, uri: Uri) -> Response {
    match overview_page(&state, &session, &uri).await {
        Ok(r) => r,
        Err(e) => error_page(&state, &session, e),
    }
}

async fn overview_page(
    state: &ConsoleState,
    session: &Session,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let lang = session.lang;
    session.caller.require(Scope::Read)?;
    let store = &state.gateway.store;
    let now = store.now().await?;
    let this_hour = now.unix_timestamp().div_euclid(3600) * 3600;
    let first = this_hour - 23 * 3600;
    let since = OffsetDateTime::from_unix_timestamp(first)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let apps = session.caller.apps_allowed();
    let rows = store.count_pushes_by_hour(since, apps.as_deref()).await?;

    let Tally {
        bars,
        totals,
        codes,
        pending,
    } = tally(&rows, first);

    let legend: Vec<Value> = view::OUTCOMES
        .iter()
        .zip(totals)
        .map(|(k, n)| json!({"key": k, "label": lang.t(chart::outcome_key(k)), "count": n}))
        .collect();
    let table: Vec<Value> = bars
        .iter()
        .filter(|b| b.total > 0)
        .map(|b| json!({"label": b.label, "counts": b.counts, "total": b.total}))
        .collect();
    let mut ctx = base(lang, Some(session), "overview", &here(uri));
    ctx.insert("chart".into(), json!(chart::svg(&bars, lang)));
    ctx.insert("legend".into(), json!(legend));
    ctx.insert("table".into(), json!(table));
    ctx.insert(
        "codes".into(),
        json!(codes
            .iter()
            .map(|(c, n)| json!({"code": c, "count": n}))
            .collect::<Vec<_>>()),
    );
    ctx.insert("pending".into(), json!(pending));
    let breaker = state.gateway.breaker.state();
    ctx.insert(
        "breaker".into(),
        json!({
            "value": breaker.as_str(),
            "label": lang.t(match breaker {
                crate::delivery::BreakerState::Closed => "breaker_closed",
                crate::delivery::BreakerState::Open => "breaker_open",
                crate::delivery::BreakerState::HalfOpen => "breaker_half_open",
            }),
            "class": match breaker {
                crate::delivery::BreakerState::Closed => "ok",
                crate::delivery::BreakerState::Open => "bad",
                crate::delivery::BreakerState::HalfOpen => "warn",
            },
        }),
    );
    ctx.insert("since".into(), json!(TimeView::of(since)));
    ctx.insert("now".into(), json!(TimeView::of(now)));
    Ok(state.render(StatusCode::OK, "overview.html", Value::Object(ctx)))
}

/// The overview's numbers: 24 hourly bars from `first`, totals per outcome group, error
/// codes by count (at most 50), and pending pushes.
struct Tally {
    bars: Vec<HourBar>,
    totals: [u64; 5],
    codes: Vec<(String, u64)>,
    pending: u64,
}

fn tally(rows: &[HourlyCount], first: i64) -> Tally {
    let mut bars: Vec<HourBar> = (0..24)
        .map(|i| {
            let hour = first + i * 3600;
            HourBar {
                hour,
                label: chart::hour_label(hour),
                counts: [0; 5],
                total: 0,
            }
        })
        .collect();
    let mut totals = [0u64; 5];
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = 0;
    for r in rows {
        let group = view::outcome(r.status);
        if let Some(bar) = usize::try_from((r.hour - first).div_euclid(3600))
            .ok()
            .and_then(|i| bars.get_mut(i))
        {
            bar.counts[group] += r.count;
            bar.total += r.count;
        }
        totals[group] += r.count;
        if r.status == PushStatus::Pending {
            pending += r.count;
        }
        if let Some(code) = &r.error_code {
            *codes.entry(code.clone()).or_default() += r.count;
        }
    }
    let mut codes: Vec<(String, u64)> = codes.into_iter().collect();
    codes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    codes.truncate(50);

    Tally {
        bars,
        totals,
        codes,
        pending,
    }
}

// ----- history -----

/// The history filter form (every field optional; empty means "any").
#[derive(Debug, Default, Deserialize)]
pub struct HistoryForm {
    app: Option<String>,
    #[serde(rename = "type")]
    cast_type: Option<String>,
    status: Option<String>,
    client: Option<String>,
    out_biz_no: Option<String>,
    msg_id: Option<String>,
    task_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
}

fn filled(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A `datetime-local` value (`2026-12-01T09:00`, Beijing time) as RFC 3339; anything else is
/// passed on for the API's own check to report.
fn beijing_time(v: &Option<String>) -> Option<String> {
    let s = filled(v)?;
    let b = s.as_bytes();
    let local = |n: usize| b.len() == n && b.get(10) == Some(&b'T');
    Some(if local(16) {
        format!("{s}:00+08:00")
    } else if local(19) {
        format!("{s}+08:00")
    } else {
        s
    })
}

impl HistoryForm {
    fn params(&self) -> ListParams {
        ListParams {
            app: filled(&self.app),
            cast_type: filled(&self.cast_type),
            status: filled(&self.status),
            client: filled(&self.client),
            out_biz_no: filled(&self.out_biz_no),
            msg_id: filled(&self.msg_id),
            task_id: filled(&self.task_id),
            from: beijing_time(&self.from),
            to: beijing_time(&self.to),
            cursor: filled(&self.cursor),
            limit: Some(50),
        }
    }

    /// The filters (without the cursor) as a query string.
    fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("app", &self.app),
            ("type", &self.cast_type),
            ("status", &self.status),
            ("client", &self.client),
            ("out_biz_no", &self.out_biz_no),
            ("msg_id", &self.msg_id),
            ("task_id", &self.task_id),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = filled(v) {
                q.append_pair(k, &v);
            }
        }
        q.finish()
    }

    fn values(&self) -> Value {
        json!({
            "app": filled(&self.app), "type": filled(&self.cast_type),
            "status": filled(&self.status), "client": filled(&self.client),
            "out_biz_no": filled(&self.out_biz_no), "msg_id": filled(&self.msg_id),
            "task_id": filled(&self.task_id), "from": filled(&self.from), "to": filled(&self.to),
        })
    }
}

pub async fn list_pushes(
    State(state): St,
    session: Session,
    uri: Uri,
    form: Result<Query<HistoryForm>, QueryRejection>,
) -> Response {
    let lang = session.lang;
    let form = form.map(|Query(f)| f).unwrap_or_default();
    let mut ctx = base(lang, Some(&session), "history", &here(&uri));
    let mut apps: Vec<&String> = state
        .gateway
        .apps
        .keys()
        .filter(|a| session.caller.0.may_use_app(a))
        .collect();
    apps.sort();
    ctx.insert("apps".into(), json!(apps));
    ctx.insert("types".into(), json!(CAST_TYPES));
    ctx.insert(
        "statuses".into(),
        json!(PushStatus::ALL
            .iter()
            .map(|s| view::status_view(*s, lang))
            .collect::<Vec<_>>()),
    );
    ctx.insert("f".into(), form.values());
    let status = match pushes::history(&state.gateway, &session.caller, form.params()).await {
        Ok(page) => {
            let rows: Vec<PushRow> = page.items.iter().map(|p| PushRow::of(p, lang)).collect();
            ctx.insert("rows".into(), json!(rows));
            if let Some(c) = page.next_cursor {
                let q = form.query();
                let sep = if q.is_empty() { "" } else { "&" };
                ctx.insert(
                    "next_page".into(),
                    json!(format!("/ui/pushes?{q}{sep}cursor={}", urlencode(&c))),
                );
            }
            if filled(&form.cursor).is_some() {
                let q = form.query();
                ctx.insert("first_page".into(), json!(format!("/ui/pushes?{q}")));
            }
            StatusCode::OK
        }
        Err(e) => {
            if e.status().is_server_error() {
                return error_page(&state, &session, e);
            }
            ctx.insert("rows".into(), json!([]));
            ctx.insert("error".into(), json!(e.problem().detail));
            e.status()
        }
    };
    state.render(status, "pushes.html", Value::Object(ctx))
}

// ----- one push -----

#[derive(Debug, Deserialize)]
pub struct DoneQuery {
    done: Option<String>,
}

async fn push_page(
    state: &ConsoleState,
    session: &Session,
    id: &str,
    status: StatusCode,
    notice: Option<(&str, String)>,
) -> Response {
    let lang = session.lang;
    if let Err(e) = session.caller.require(Scope::Read) {
        return error_page(state, session, e);
    }
    let push = match pushes::visible_push(&state.gateway, &session.caller, id).await {
        Ok(p) => p,
        Err(e) => return error_page(state, session, e),
    };
    let mut ctx = base(
        lang,
        Some(session),
        "history",
        &format!("/ui/pushes/{}", urlencode(&push.id)),
    );
    ctx.insert("p".into(), json!(PushDetail::of(&push, lang)));
    if let Some((kind, text)) = notice {
        ctx.insert("notice".into(), json!({"kind": kind, "text": text}));
    }
    state.render(status, "push.html", Value::Object(ctx))
}

pub async fn show_push(
    State(state): St,
    session: Session,
    Path(id): Path<String>,
    done: Result<Query<DoneQuery>, QueryRejection>,
) -> Response {
    let lang = session.lang;
    let notice = match done.ok().and_then(|Query(d)| d.done).as_deref() {
        Some("refreshed") => Some(("ok", lang.t("done_refreshed").to_owned())),
        Some("cancelled") => Some(("ok", lang.t("done_cancelled").to_owned())),
        Some("withdrawn") => Some(("ok", lang.t("done_withdrawn").to_owned())),
        _ => None,
    };
    push_page(&state, &session, &id, StatusCode::OK, notice).await
}

pub async fn refresh_push(
    State(state): St,
    session: Session,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if !session.csrf_ok(&state, csrf_of(form).as_deref()) {
        return refused(&state, session.lang, Some(&session));
    }
    match pushes::refresh(&state.gateway, &session.caller, &id).await {
        Ok(p) => see_other(&format!("/ui/pushes/{}?done=refreshed", p.id), &[]),
        Err(e) => task_call_failed(&state, &session, &id, e).await,
    }
}

/// After a failed refresh or cancel: the push page with the reason, and the API's status.
async fn task_call_failed(
    state: &ConsoleState,
    session: &Session,
    id: &str,
    e: ApiError,
) -> Response {
    // Umeng's refusal or silence is news about this push: show it there. Anything else
    // (no such push, no scope, the database) is an error page.
    let about_the_push = matches!(
        e,
        ApiError::Conflict { .. } | ApiError::Upstream { .. } | ApiError::UpstreamTimeout { .. }
    );
    if !about_the_push {
        return error_page(state, session, e);
    }
    tracing::warn!(push.id = %id, error = %e, "console task call failed");
    push_page(
        state,
        session,
        id,
        e.status(),
        Some(("error", e.problem().detail)),
    )
    .await
}

pub async fn confirm_cancel(
    State(state): St,
    session: Session,
    Path(id): Path<String>,
    uri: Uri,
) -> Response {
    let lang = session.lang;
    if let Err(e) = session.caller.require(Scope::Cancel) {
        return error_page(&state, &session, e);
    }
    let push = match pushes::visible_push(&state.gateway, &session.caller, &id).await {
        Ok(p) => p,
        Err(e) => return error_page(&state, &session, e),
    };
    let detail = PushDetail::of(&push, lang);
    if !detail.cancellable {
        // Nothing to confirm: the push page says why there is no Cancel.
        return see_other(&format!("/ui/pushes/{}", push.id), &[]);
    }
    let mut ctx = base(lang, Some(&session), "history", &here(&uri));
    ctx.insert("p".into(), json!(detail));
    state.render(StatusCode::OK, "cancel.html", Value::Object(ctx))
}

pub async fn cancel_push(
    State(state): St,
    session: Session,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if !session.csrf_ok(&state, csrf_of(form).as_deref()) {
        return refused(&state, session.lang, Some(&session));
    }
    match pushes::cancel(&state.gateway, &session.caller, &id).await {
        Ok(p) => {
            let done = if p.status == PushStatus::Withdrawn {
                "withdrawn"
            } else {
                "cancelled"
            };
            see_other(&format!("/ui/pushes/{}?done={done}", p.id), &[])
        }
        Err(e) => task_call_failed(&state, &session, &id, e).await,
    }
}

// ----- queue -----

/// The queue's states, in the order the page lists them: due first, then held.
const QUEUE_STATES: [PushStatus; 4] = [
    PushStatus::Pending,
    PushStatus::AwaitingSend,
    PushStatus::AwaitingQuota,
    PushStatus::AwaitingSendAt,
];
/// The most pushes of one state the queue page lists (the newest; History has them all).
const QUEUE_ROWS: u32 = 100;

fn queue_rank(s: PushStatus) -> usize {
    QUEUE_STATES
        .iter()
        .position(|q| *q == s)
        .unwrap_or(QUEUE_STATES.len())
}

fn history_link(status: PushStatus, app: Option<&str>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(app) = app {
        q.append_pair("app", app);
    }
    q.append_pair("status", status.as_str());
    format!("/ui/pushes?{}", q.finish())
}

pub async fn show_queue(State(state): St, session: Session, uri: Uri) -> Response {
    match queue_page(&state, &session, &uri).await {
        Ok(r) => r,
        Err(e) => error_page(&state, &session, e),
    }
}

async fn queue_page(
    state: &ConsoleState,
    session: &Session,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let lang = session.lang;
    session.caller.require(Scope::Read)?;
    let store = &state.gateway.store;
    let now = store.now().await?;

    // Per app and state: the store's counts, for the apps this client may see.
    let mut stats = store.queue_stats().await?;
    stats.retain(|q| session.caller.0.may_use_app(&q.app));
    stats.sort_by(|a, b| {
        a.app
            .cmp(&b.app)
            .then(queue_rank(a.status).cmp(&queue_rank(b.status)))
    });
    let stat_rows: Vec<Value> = stats
        .iter()
        .map(|q| {
            json!({
                "app": q.app,
                "status": view::status_view(q.status, lang),
                "count": q.count,
                "oldest_due": q.oldest_due.map(TimeView::of),
                "waited": q.oldest_due.map(|t| view::duration((now - t).whole_seconds(), lang)),
                "link": history_link(q.status, Some(&q.app)),
            })
        })
        .collect();

    // The pushes themselves: History's query, one state at a time.
    let mut rows: Vec<QueueRow> = Vec::new();
    let mut cut: Vec<Value> = Vec::new();
    for status in QUEUE_STATES {
        let params = ListParams {
            status: Some(status.as_str().to_owned()),
            limit: Some(QUEUE_ROWS),
            ..ListParams::default()
        };
        let page = pushes::history(&state.gateway, &session.caller, params).await?;
        if page.next_cursor.is_some() {
            cut.push(json!({
                "status": view::status_view(status, lang),
                "link": history_link(status, None),
            }));
        }
        rows.extend(
            page.items
                .iter()
                // A synchronous push is pending while its caller's request waits: not queued.
                .filter(|p| status != PushStatus::Pending || p.delivery == DeliveryMode::Async)
                .map(|p| QueueRow::of(p, now, lang)),
        );
    }
    // Being sent first, then by when each goes out.
    rows.sort_by(|a, b| {
        let waiting = |r: &QueueRow| r.row.status.value != PushStatus::Pending.as_str();
        waiting(a)
            .cmp(&waiting(b))
            .then(a.due_at.cmp(&b.due_at))
            .then(a.row.id.cmp(&b.row.id))
    });

    let mut ctx = base(lang, Some(session), "queue", &here(uri));
    ctx.insert("stats".into(), json!(stat_rows));
    ctx.insert(
        "total".into(),
        json!(stats.iter().map(|q| q.count).sum::<u64>()),
    );
    ctx.insert("rows".into(), json!(rows));
    ctx.insert("cut".into(), json!(cut));
    ctx.insert("max_rows".into(), json!(QUEUE_ROWS));
    ctx.insert("now".into(), json!(TimeView::of(now)));
    Ok(state.render(StatusCode::OK, "queue.html", Value::Object(ctx)))
}

// ----- quotas -----

pub async fn list_quotas(State(state): St, session: Session, uri: Uri) -> Response {
    let lang = session.lang;
    let entries = match quotas::quota_entries(&state.gateway, &session.caller, None).await {
        Ok(e) => e,
        Err(e) => return error_page(&state, &session, e),
    };
    let rows: Vec<Value> = entries
        .iter()
        .map(|q| {
            let window_key = match q.window.as_str() {
                "minute" => "w_minute",
                "hour" => "w_hour",
                _ => "w_day",
            };
            json!({
                "app": q.app,
                "kind": q.kind.as_str(),
                "window": lang.t(window_key),
                "used": q.used,
                "limit": q.limit,
                "remaining": q.remaining,
                "low": (f64::from(q.limit) * 0.7).floor(),
                "high": (f64::from(q.limit) * 0.9).floor(),
                "full": q.remaining == 0,
                "reset_at": TimeView::of(q.reset_at),
                "reset_in": view::duration(q.reset_after_secs, lang),
            })
        })
        .collect();
    let mut ctx = base(lang, Some(&session), "quotas", &here(&uri));
    ctx.insert("rows".into(), json!(rows));
    state.render(StatusCode::OK, "quotas.html", Value::Object(ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_local_values_are_beijing_time() {
        let t = |s: &str| beijing_time(&Some(s.to_owned()));
        assert_eq!(t("2026-12-01T09:00").unwrap(), "2026-12-01T09:00:00+08:00");
        assert_eq!(
            t("2026-12-01T09:00:30").unwrap(),
            "2026-12-01T09:00:30+08:00"
        );
        assert_eq!(t("2026-12-01T09:00:00Z").unwrap(), "2026-12-01T09:00:00Z");
        assert_eq!(t("  "), None);
    }

    #[test]
    fn tally_groups_hours_outcomes_and_codes() {
        let row = |hour: i64, status, code: Option<&str>, count| HourlyCount {
            hour,
            status,
            error_code: code.map(str::to_owned),
            count,
        };
        let first = 36_000;
        let rows = [
            row(first, PushStatus::Accepted, None, 3),
            row(first, PushStatus::Failed, Some("2018"), 2),
            row(first + 23 * 3600, PushStatus::Done, None, 1),
            row(first + 23 * 3600, PushStatus::SendFailed, Some("2018"), 1),
            row(first + 23 * 3600, PushStatus::Pending, None, 4),
            // Outside the 24 hours (a clock step): counted in the totals only.
            row(first + 24 * 3600, PushStatus::Unknown, Some("5000"), 1),
        ];
        let t = tally(&rows, first);
        assert_eq!(t.bars.len(), 24);
        assert_eq!((t.bars[0].counts, t.bars[0].total), ([3, 2, 0, 0, 0], 5));
        assert_eq!((t.bars[23].counts, t.bars[23].total), ([1, 1, 0, 4, 0], 6));
        assert_eq!(t.totals, [4, 3, 1, 4, 0]);
        assert_eq!(
            t.codes,
            vec![("2018".to_owned(), 3), ("5000".to_owned(), 1)]
        );
        assert_eq!(t.pending, 4);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(view::duration(7500, Lang::En), "2 h 05 min");
        assert_eq!(view::duration(249, Lang::En), "4 min 09 s");
        assert_eq!(view::duration(12, Lang::ZhCn), "12 秒");
    }
}
