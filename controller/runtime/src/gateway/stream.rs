//! Streaming: a prediction's server-sent events (`GET /v1/predictions/{id}/stream`, in Replicate's shape) and where
//! a streaming prediction's partial outputs go while it runs ([`output_sink`]).
//!
//! A prediction created with `"stream": true`, or of a deployment whose model may stream ([`Backend::streams`]: a
//! process model server), is run through [`Backend::predict_streaming`]: each partial output is
//! appended to its `output` (a list while it runs, so `GET /v1/predictions/{id}` shows the output so far) and its
//! watch counter bumped, which wakes its event streams. When it finishes, `output` is the whole output the model
//! answered. Other predictions (a native model's) are run as before and their stream sends the output once, whole.

use std::{convert::Infallible, sync::Arc};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, Sse},
    },
};
use serde_json::Value;

use super::{Backend, Gateway, OutputSink, PredictionStatus, routes::problem};

/// The sink of prediction `id`'s partial outputs: each is appended to its `output`, and its event streams woken.
/// An output that arrives after the prediction finished (canceled, or cut off by a shutdown) is dropped.
pub(super) fn output_sink<B: Backend>(gw: Arc<Gateway<B>>, id: String) -> OutputSink {
    Box::new(move |output: Value| {
        let mut store = gw.lock();
        let Some(p) = store.map.get_mut(&id).filter(|p| !p.finished()) else { return };
        let Some(partials) = &p.partials else { return };
        if !p.output.is_array() {
            p.output = Value::Array(Vec::new());
        }
        if let Value::Array(list) = &mut p.output {
            list.push(output);
            partials.send_replace(list.len());
        }
    })
}

/// The `data` of an `output` event: a string as it is (a token streams as its text, as Replicate's do), anything
/// else as JSON.
fn output_data(output: &Value) -> String {
    match output {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What an event stream reads of its prediction each time it wakes.
enum Seen {
    /// New partial outputs, still running.
    Running(Vec<Value>),
    /// Finished: the outputs not sent yet, then `error` if it failed.
    Finished { outputs: Vec<Value>, error: Option<String> },
}

/// `GET /v1/predictions/{id}/stream`: server-sent events, as Replicate's: `output` events, or `error`, then `done`,
/// each with an `id` (the Python client drops an event without one). A prediction of a model that streams sends an
/// `output` per partial output as the model produces it; any other sends its output
/// once, whole (a string as its text, anything else as JSON). A stream opened after partial outputs were produced
/// sends them all first. Opened with the prediction's `token` (the capability in its `urls.stream`) or with a key
/// of its namespace.
pub(super) async fn stream<B: Backend>(
    State(gw): State<Arc<Gateway<B>>>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let token = uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let by_token = match (token, &gw.webhooks.secret) {
        (Some(token), Some(secret)) => secret.stream_token_matches(&id, token),
        _ => false,
    };
    let caller = gw.namespace_of(&headers);
    if !by_token && caller.is_none() {
        return gw.unauthorized();
    }
    let (done, mut progress) = match gw.lock().map.get(&id) {
        Some(p) if by_token || p.model.split('/').next() == caller.as_deref() => {
            (Arc::clone(&p.done), p.partials.as_ref().map(|w| w.subscribe()))
        }
        _ => return problem(StatusCode::NOT_FOUND, format!("prediction {id} not found")),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut next_id = 0u64;
        let mut event = |name: &str, data: String| {
            let e = Event::default().event(name).data(data).id(next_id.to_string());
            next_id += 1;
            Ok(e)
        };
        loop {
            // Registered before the prediction is read, so a finish in between still wakes this stream.
            let finished = done.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let seen = {
                let store = gw.lock();
                match store.map.get(&id) {
                    None => Seen::Finished { outputs: Vec::new(), error: Some("the prediction expired".into()) },
                    Some(p) => {
                        // Outputs go one by one once the model streamed one; a model that answered whole sends it
                        // whole.
                        let streamed = p.partials.as_ref().is_some_and(|w| *w.borrow() > 0);
                        let list = p.output.as_array().filter(|_| streamed);
                        let new = || list.map(|l| l.iter().skip(sent).cloned().collect()).unwrap_or_default();
                        match p.status {
                            PredictionStatus::Starting | PredictionStatus::Processing => Seen::Running(new()),
                            PredictionStatus::Succeeded => Seen::Finished {
                                // A streamed list goes on from the last output sent; anything else goes whole,
                                // unless partial outputs of it were sent already.
                                outputs: match list {
                                    Some(_) => new(),
                                    None if sent == 0 => vec![p.output.clone()],
                                    None => Vec::new(),
                                },
                                error: None,
                            },
                            // Failed or canceled: the outputs it produced first, then why.
                            _ => Seen::Finished {
                                outputs: new(),
                                error: Some(p.error.clone().unwrap_or_else(|| p.status.to_string())),
                            },
                        }
                    }
                }
            };
            let (outputs, end) = match seen {
                Seen::Running(outputs) => (outputs, None),
                Seen::Finished { outputs, error } => (outputs, Some(error)),
            };
            sent += outputs.len();
            for output in outputs {
                if tx.send(event("output", output_data(&output))).await.is_err() {
                    return; // The client went away.
                }
            }
            if let Some(error) = end {
                if let Some(error) = error {
                    let _ = tx.send(event("error", error)).await;
                }
                let _ = tx.send(event("done", "{}".into())).await;
                return;
            }
            match &mut progress {
                Some(progress) => {
                    tokio::select! {
                        () = &mut finished => {}
                        // An error: the counter is gone with the prediction, and the next read says it expired.
                        _ = progress.changed() => {}
                    }
                }
                None => finished.await,
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}
