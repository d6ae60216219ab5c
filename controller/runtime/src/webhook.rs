//! Webhook delivery for predictions, as Replicate does it: the prediction's JSON is POSTed to the URL the client
//! gave, for the events it asked for (`start`, `completed`; `output` and `logs` coincide with `completed` here, as
//! outputs are not streamed through webhooks). A delivery that fails (connection error, timeout, non-2xx) is
//! retried with exponential backoff and jitter, up to a fixed number of attempts; each attempt carries the same
//! `webhook-id`, so a receiver can drop duplicates. Deliveries run on their own tasks: a slow receiver never holds
//! up a prediction. With a signing [`Secret`], each attempt is signed as the Standard Webhooks spec (and Replicate)
//! does: `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, so
//! Replicate's client libraries validate Kiln's webhooks unchanged.

use std::{
    hash::{BuildHasher, Hasher},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A webhook signing secret: `whsec_` and the base64 of its key bytes.
#[derive(Clone)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let text = text.trim();
        let encoded = text.strip_prefix("whsec_").ok_or("a webhook secret starts with whsec_")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("the webhook secret after whsec_ is not base64: {e}"))?;
        if key.len() < 16 {
            return Err("a webhook secret needs at least 16 key bytes".into());
        }
        Ok(Self { text: text.to_owned(), key })
    }

    /// A new random secret (24 bytes from the system's random source).
    pub fn generate() -> std::io::Result<Self> {
        use base64::Engine as _;
        use std::io::Read as _;
        let mut key = vec![0u8; 24];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        let text = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key));
        Ok(Self { text, key })
    }

    /// The `whsec_...` text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The `webhook-signature` value for a delivery.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        use base64::Engine as _;
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Why a webhook URL is refused at creation.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("webhook {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        _ => Err(format!("webhook {url:?} must be an http:// or https:// URL with a host")),
    }
}

/// Delivers webhooks.
#[derive(Clone)]
pub struct Webhooks {
    client: Client<Https, Full<Bytes>>,
    /// First retry delay (doubled per attempt).
    pub backoff: Duration,
    /// Attempts per delivery.
    pub attempts: u32,
    /// Time one attempt may take.
    pub timeout: Duration,
    /// Signs deliveries when set.
    pub secret: Option<Secret>,
    /// Deliveries not finished yet (delivered or given up), shared by clones.
    pending: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").field("backoff", &self.backoff).field("attempts", &self.attempts).finish()
    }
}

impl Default for Webhooks {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), 6)
    }
}

impl Webhooks {
    /// A sender retrying `attempts` times from `backoff`. HTTPS uses the system's CA certificates; without any, only
    /// `http://` webhooks can be delivered (said once in the log).
    pub fn new(backoff: Duration, attempts: u32) -> Self {
        let provider = rustls::crypto::ring::default_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match builder.with_provider_and_native_roots(provider) {
            Ok(b) => b.https_or_http().enable_http1().build(),
            Err(e) => {
                tracing::warn!(error = %e, "no CA certificates: https:// webhooks will fail");
                let config =
                    rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
                        .with_safe_default_protocol_versions()
                        .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth());
                match config {
                    Ok(config) => hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(config)
                        .https_or_http()
                        .enable_http1()
                        .build(),
                    Err(_) => unreachable!("ring supports the default protocol versions"),
                }
            }
        };
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            client,
            backoff,
            attempts: attempts.max(1),
            timeout: Duration::from_secs(10),
            secret: None,
            pending: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Sends `body` to `url` in the background, retrying; `id` identifies the delivery (`webhook-id`).
    pub fn send(&self, url: String, id: String, body: &Value) {
        let this = self.clone();
        let bytes = Bytes::from(body.to_string());
        self.pending.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            match this.deliver(&url, &id, bytes).await {
                Ok(attempt) => tracing::debug!(%url, %id, attempt, "webhook delivered"),
                Err(e) => tracing::warn!(%url, %id, error = %e, "webhook given up"),
            }
            this.pending.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    /// Deliveries under way (including those waiting to retry).
    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until every delivery under way is delivered or given up, at most `within`; whether they all were.
    /// A shutdown calls it so the `completed` webhooks of the last predictions go out before the process ends.
    pub async fn settle(&self, within: Duration) -> bool {
        let mut rx = self.pending.subscribe();
        tokio::time::timeout(within, rx.wait_for(|n| *n == 0)).await.is_ok()
    }

    /// Delivers with retries; returns the attempt that succeeded.
    pub async fn deliver(&self, url: &str, id: &str, body: Bytes) -> Result<u32, String> {
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let mut request = axum::http::Request::post(url)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header(axum::http::header::USER_AGENT, "kiln-gateway")
                .header("webhook-id", id);
            if let Some(secret) = &self.secret {
                let timestamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                request = request
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", secret.sign(id, timestamp, &body));
            }
            let request = request.body(Full::new(body.clone())).map_err(|e| format!("building the request: {e}"))?;
            match tokio::time::timeout(self.timeout, self.client.request(request)).await {
                Ok(Ok(r)) if r.status().is_success() => return Ok(attempt),
                Ok(Ok(r)) => last = format!("status {}", r.status()),
                Ok(Err(e)) => last = format!("{e}"),
                Err(_) => last = format!("no answer within {:?}", self.timeout),
            }
            if attempt < self.attempts {
                let base = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
                // Up to a quarter more, so many failed deliveries do not retry in step.
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write(id.as_bytes());
                h.write_u32(attempt);
                let jitter = base.mul_f64((h.finish() % 256) as f64 / 1024.0);
                tokio::time::sleep(base + jitter).await;
            }
        }
        Err(format!("{} attempts failed; last: {last}", self.attempts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_an_independent_hmac() {
        // Expected value computed with Python's hmac/hashlib/base64, as Replicate's client validates.
        let secret = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap();
        let body = br#"{"id":"x","status":"succeeded"}"#;
        assert_eq!(
            secret.sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1_674_087_231, body),
            "v1,R+Gs9epiJ31XpzDXcPyzq2NdSCFb6RrpuT5wbkpgcz4="
        );
        assert!(Secret::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap_err().contains("whsec_"));
        assert!(Secret::parse("whsec_!!").unwrap_err().contains("base64"));
        let fresh = Secret::generate().unwrap();
        assert!(fresh.as_str().starts_with("whsec_") && Secret::parse(fresh.as_str()).is_ok());
        assert_ne!(fresh.as_str(), Secret::generate().unwrap().as_str());
    }

    #[test]
    fn webhook_urls_must_be_http_or_https_with_a_host() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://10.0.0.1:8000/x").is_ok());
        assert!(check_url("ftp://example.com").unwrap_err().contains("http://"));
        assert!(check_url("not a url").unwrap_err().contains("not a URL"));
        assert!(check_url("/relative").is_err());
    }
}
