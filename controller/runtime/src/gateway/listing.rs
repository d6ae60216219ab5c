//! Replicate's listings, each a page `{"previous": url|null, "next": url|null, "results": [...]}` of at most
//! [`PAGE_SIZE`] with cursor URLs: `GET /v1/predictions` (newest first by `created_at`) and `GET /v1/deployments`
//! (by `owner/name`); and one deployment, `GET /v1/deployments/{owner}/{name}`. A tenant's key lists its
//! namespace's, an operator's every namespace's.
//!
//! A cursor names the item a page starts after or ends before (`a...` / `b...`), so pages stay consistent while
//! predictions are created: a new one shows up on the first page, never twice. A cursor this gateway did not make
//! is a 400.

use std::{cmp::Reverse, sync::Arc, time::SystemTime};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    Backend, Caller, Gateway,
    account::account_json,
    catalog::{DeploymentInfo, sku},
    response::Rfc3339,
    routes::problem,
};

/// Items on a page, as Replicate's API pages them.
pub const PAGE_SIZE: usize = 100;

/// Where a page begins: after an item (the next page) or before one (the previous page), by the listing's order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor<K> {
    After(K),
    Before(K),
}

/// One page of a listing, and whether there are items before and after it.
#[derive(Debug)]
struct Window<T> {
    items: Vec<T>,
    more_before: bool,
    more_after: bool,
}

/// The page of `items` (in any order) that `cursor` asks for, in ascending `key` order: the first `size` after
/// the cursor, or the last `size` before it; the first page without one. Linear in the items (a selection, then a
/// sort of the page only).
fn window<T, K: Ord>(items: Vec<T>, key: impl Fn(&T) -> &K, cursor: Option<&Cursor<K>>, size: usize) -> Window<T> {
    let (mut chosen, mut before_cursor, mut after_cursor) = (Vec::new(), false, false);
    for item in items {
        let k = key(&item);
        match cursor {
            Some(Cursor::After(c)) if k <= c => before_cursor = true,
            Some(Cursor::Before(c)) if k >= c => after_cursor = true,
            _ => chosen.push(item),
        }
    }
    let n = chosen.len();
    let (start, end) = match cursor {
        Some(Cursor::Before(_)) => (n.saturating_sub(size), n),
        _ => (0, n.min(size)),
    };
    if start > 0 {
        chosen.select_nth_unstable_by(start, |a, b| key(a).cmp(key(b)));
    } else if end < n {
        chosen.select_nth_unstable_by(end, |a, b| key(a).cmp(key(b)));
    }
    chosen.truncate(end);
    chosen.drain(..start);
    chosen.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    Window { items: chosen, more_before: before_cursor || start > 0, more_after: after_cursor || end < n }
}

/// The `cursor` query parameter of `uri`, if any.
fn cursor_param(uri: &Uri) -> Option<&str> {
    uri.query()?.split('&').find_map(|kv| kv.strip_prefix("cursor="))
}

/// Parses a cursor's text: `a` or `b`, then the key as `parse` reads it.
fn parse_cursor<'a, K>(text: &'a str, parse: impl Fn(&'a str) -> Option<K>) -> Option<Cursor<K>> {
    let (kind, rest) = text.split_at_checked(1)?;
    match kind {
        "a" => parse(rest).map(Cursor::After),
        "b" => parse(rest).map(Cursor::Before),
        _ => None,
    }
}

/// The page's JSON: `previous` and `next` as URLs of `path` with a cursor (`write` gives a key's text).
fn page_json<T, K>(
    window: &Window<T>,
    results: Vec<Value>,
    base: &str,
    path: &str,
    key: impl Fn(&T) -> &K,
    write: impl Fn(&K) -> String,
) -> Value {
    let url = |cursor: String| format!("{base}{path}?cursor={cursor}");
    let previous = window.items.first().filter(|_| window.more_before).map(|f| url(format!("b{}", write(key(f)))));
    let next = window.items.last().filter(|_| window.more_after).map(|l| url(format!("a{}", write(key(l)))));
    json!({ "previous": previous, "next": next, "results": results })
}

fn bad_cursor(text: &str) -> Response {
    problem(StatusCode::BAD_REQUEST, format!("cursor {text:?} is not one this gateway gave out"))
}

/// A prediction's place in the listing: newest first, ties by id (borrowed from the prediction, or from a cursor).
type PredictionKey<'a> = Reverse<(SystemTime, &'a str)>;

fn write_prediction_key(k: &PredictionKey<'_>) -> String {
    let (at, id) = &k.0;
    format!("{}-{id}", at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos())
}

fn read_prediction_key(text: &str) -> Option<PredictionKey<'_>> {
    let (nanos, id) = text.split_once('-')?;
    let nanos: u64 = nanos.parse().ok()?;
    let valid = !id.is_empty() && id.bytes().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| Reverse((SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos), id)))
}

/// The first of a pair (a listing's key, computed once per item).
fn first<K, T>(pair: &(K, T)) -> &K {
    &pair.0
}

fn deployment_key(d: &DeploymentInfo) -> &String {
    &d.key
}

/// Whether `caller` may see what belongs to `namespace`.
pub(super) fn can_see(caller: &Caller, namespace: &str) -> bool {
    match caller {
        Caller::Operator => true,
        Caller::Tenant(ns) => ns == namespace,
    }
}

/// `GET /v1/predictions`: the caller's predictions (an operator's key: all), newest first, a page at a time.
pub(super) async fn predictions<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(caller) = gw.caller(&headers) else { return gw.unauthorized() };
    let cursor = match cursor_param(&uri) {
        None => None,
        Some(text) => match parse_cursor(text, read_prediction_key) {
            Some(c) => Some(c),
            None => return bad_cursor(text),
        },
    };
    let key = first::<PredictionKey<'_>, &super::Prediction>;
    let store = gw.lock();
    let visible: Vec<(PredictionKey<'_>, &super::Prediction)> = store
        .map
        .values()
        .filter(|p| can_see(&caller, p.model.split_once('/').map_or(p.model.as_str(), |(ns, _)| ns)))
        .map(|p| (Reverse((p.created_at, p.id.as_str())), &**p))
        .collect();
    let window = window(visible, key, cursor.as_ref(), PAGE_SIZE);
    let results: Vec<Value> =
        window.items.iter().filter_map(|(_, p)| serde_json::to_value(p.response(&gw.base_url)).ok()).collect();
    let page = page_json(&window, results, &gw.base_url, "/v1/predictions", key, write_prediction_key);
    drop(store);
    Json(page).into_response()
}

/// A deployment in Replicate's shape: `owner`, `name`, `current_release` (`number`, `model`, `version`,
/// `created_at`, `created_by`, `configuration` with `hardware`, `min_instances`, `max_instances`).
pub(super) fn deployment_json(d: &DeploymentInfo) -> Value {
    let (owner, name) = d.owner_and_name();
    json!({
        "owner": owner,
        "name": name,
        "current_release": {
            "number": d.release,
            "model": d.key,
            "version": d.version,
            "created_at": Rfc3339(d.released_at).to_string(),
            "created_by": account_json(owner),
            "configuration": {
                "hardware": d.gpu_model.as_deref().map_or_else(|| "gpu".to_owned(), sku),
                "min_instances": d.min_instances,
                "max_instances": d.max_instances,
            },
        },
    })
}

/// `GET /v1/deployments`: the caller's deployments (an operator's key: all) in Replicate's shape, by
/// `owner/name`, a page at a time. Kiln's own listing (replicas, placements, failures, nodes) is
/// `GET /kiln/v1/deployments`.
pub(super) async fn deployments<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let Some(caller) = gw.caller(&headers) else { return gw.unauthorized() };
    let read = |text: &str| {
        let key = text.replacen('~', "/", 1);
        key.bytes().all(|c| c.is_ascii_alphanumeric() || b"-./".contains(&c)).then_some(key)
    };
    let cursor = match cursor_param(&uri) {
        None => None,
        Some(text) => match parse_cursor(text, read) {
            Some(c) => Some(c),
            None => return bad_cursor(text),
        },
    };
    let visible: Vec<DeploymentInfo> =
        gw.catalog.deployments().into_iter().filter(|d| can_see(&caller, d.owner_and_name().0)).collect();
    let key = deployment_key;
    let window = window(visible, key, cursor.as_ref(), PAGE_SIZE);
    let results = window.items.iter().map(deployment_json).collect();
    let write = |k: &String| k.replacen('/', "~", 1);
    Json(page_json(&window, results, &gw.base_url, "/v1/deployments", key, write)).into_response()
}

/// `GET /v1/deployments/{owner}/{name}`: one deployment in Replicate's shape (403 for another namespace's key).
pub(super) async fn deployment<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match gw.described(&headers, &owner, &name) {
        Ok(d) => Json(deployment_json(&d)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Why a deployment cannot be described to a caller.
#[derive(Debug, thiserror::Error)]
pub(super) enum LookupError {
    /// No key, or one the gateway does not know (401).
    #[error("missing or unknown API key (Authorization: Bearer <key>)")]
    Unauthorized,
    /// The key is another namespace's (403).
    #[error("this API key does not give access to namespace {0}")]
    Forbidden(String),
    /// No such deployment (404).
    #[error("deployment {0} not found")]
    NotFound(String),
}

impl IntoResponse for LookupError {
    fn into_response(self) -> Response {
        let status = match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
        };
        problem(status, self.to_string())
    }
}

impl<B: Backend> Gateway<B> {
    /// The deployment `owner/name` as the caller may read it.
    pub(super) fn described(
        &self,
        headers: &HeaderMap,
        owner: &str,
        name: &str,
    ) -> Result<DeploymentInfo, LookupError> {
        let caller = self.caller(headers).ok_or(LookupError::Unauthorized)?;
        if !can_see(&caller, owner) {
            return Err(LookupError::Forbidden(owner.to_owned()));
        }
        let key = format!("{owner}/{name}");
        self.catalog.deployment(&key).ok_or(LookupError::NotFound(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(items: &[u32], cursor: Option<Cursor<u32>>, size: usize) -> (Vec<u32>, bool, bool) {
        let w = window(items.to_vec(), |i| i, cursor.as_ref(), size);
        (w.items, w.more_before, w.more_after)
    }

    #[test]
    fn windows_page_forward_and_back_around_the_cursor() {
        let items = [5, 1, 4, 2, 3, 7, 6];
        assert_eq!(page(&items, None, 3), (vec![1, 2, 3], false, true));
        assert_eq!(page(&items, Some(Cursor::After(3)), 3), (vec![4, 5, 6], true, true));
        assert_eq!(page(&items, Some(Cursor::After(6)), 3), (vec![7], true, false));
        assert_eq!(page(&items, Some(Cursor::Before(7)), 3), (vec![4, 5, 6], true, true));
        assert_eq!(page(&items, Some(Cursor::Before(4)), 3), (vec![1, 2, 3], false, true));
        assert_eq!(page(&items, Some(Cursor::Before(3)), 3), (vec![1, 2], false, true));
        assert_eq!(page(&[], None, 3), (vec![], false, false));
        assert_eq!(page(&items, None, 10), (vec![1, 2, 3, 4, 5, 6, 7], false, false));
    }

    #[test]
    fn cursors_read_back_what_was_written_and_refuse_anything_else() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_764_072_000, 123);
        let k = Reverse((at, "abc234"));
        let text = format!("a{}", write_prediction_key(&k));
        assert_eq!(parse_cursor(&text, read_prediction_key), Some(Cursor::After(k)));
        for bad in ["", "x1-a", "a", "a1", "a1-", "ax-abc", "a1-a/b", "b1-a b"] {
            assert_eq!(parse_cursor(bad, read_prediction_key), None, "{bad:?}");
        }
        let uri: Uri = "/v1/predictions?x=1&cursor=a5-q".parse().unwrap();
        assert_eq!(cursor_param(&uri), Some("a5-q"));
    }
}
