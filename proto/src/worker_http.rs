//! The worker endpoint's plain HTTP/1.1 predict route: the same call as `WorkerService.Predict`, for the gateway's
//! hot path. An agent that sets `Register.worker_http1` answers it on its worker port beside the gRPC service (the
//! port tells the two apart by the HTTP/2 preface). It exists because it is cheaper: one request, one response on a
//! keep-alive connection the caller drives itself, with no HTTP/2 framing, HPACK or connection task in between —
//! `kiln bench gateway` measures both hops.
//!
//! - Request: `POST /v1/predict`, the input as the body (`Content-Type` as `PredictRequest.content_type`), the replica
//!   in [`REPLICA_HEADER`], and for a process replica the model server's path, when not the default, in
//!   [`PATH_HEADER`].
//! - Success: `200`, the output as the body (what `PredictResponse.output` holds).
//! - Failure: the gRPC status code in [`STATUS_HEADER`] (its number), an HTTP status chosen from it
//!   ([`http_status`]), and the message as the body (UTF-8 text). [`status_of`] turns an answer back into the
//!   `tonic::Status` the gRPC call would have returned, so a caller handles both hops alike.

/// The route.
pub const PREDICT_PATH: &str = "/v1/predict";
/// The replica the prediction is for.
pub const REPLICA_HEADER: &str = "x-kiln-replica";
/// For a process replica: the path on its model server (default `/predictions`).
pub const PATH_HEADER: &str = "x-kiln-path";
/// On a failure: the gRPC status code, as its number.
pub const STATUS_HEADER: &str = "x-kiln-status";
/// The largest input and the largest output, bytes: tonic's default message limit, so both hops take the same.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The HTTP status a failure with gRPC `code` is answered with (informative only: [`STATUS_HEADER`] is what counts).
pub fn http_status(code: tonic::Code) -> u16 {
    use tonic::Code::*;
    match code {
        Ok => 200,
        InvalidArgument | FailedPrecondition | OutOfRange => 400,
        Unauthenticated => 401,
        PermissionDenied => 403,
        NotFound => 404,
        AlreadyExists | Aborted => 409,
        ResourceExhausted => 429,
        Cancelled => 499,
        Unimplemented => 501,
        Unavailable => 503,
        DeadlineExceeded => 504,
        Unknown | Internal | DataLoss => 500,
    }
}

/// The status of a failed answer: the code in [`STATUS_HEADER`] when there is one (`header`), otherwise one read
/// from the HTTP `status` (an answer from something that is not an agent's route, e.g. a proxy), with `body` as the
/// message.
pub fn status_of(status: u16, header: Option<&str>, body: &[u8]) -> tonic::Status {
    let code = match header.and_then(|h| h.trim().parse::<i32>().ok()) {
        Some(n) => tonic::Code::from_i32(n),
        None => match status {
            400 => tonic::Code::InvalidArgument,
            404 | 405 | 501 => tonic::Code::Unimplemented,
            429 => tonic::Code::ResourceExhausted,
            502..=504 => tonic::Code::Unavailable,
            _ => tonic::Code::Unknown,
        },
    };
    let message = String::from_utf8_lossy(body);
    let message = if header.is_none() { format!("HTTP {status}: {message}") } else { message.into_owned() };
    tonic::Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_goes_through_the_header_and_back() {
        for n in 1..=16 {
            let code = tonic::Code::from_i32(n);
            let status = status_of(http_status(code), Some(&n.to_string()), "why".as_bytes());
            assert_eq!((status.code(), status.message()), (code, "why"));
            assert!((400..600).contains(&http_status(code)), "{code:?} is answered as a failure");
        }
    }

    #[test]
    fn an_answer_without_the_header_is_read_from_its_http_status() {
        let status = status_of(404, None, b"no route");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(status.message(), "HTTP 404: no route");
        assert_eq!(status_of(503, None, b"").code(), tonic::Code::Unavailable);
        assert_eq!(status_of(500, Some("bogus"), b"").code(), tonic::Code::Unknown);
    }
}
