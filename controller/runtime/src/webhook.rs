//! Webhook delivery for predictions, as Replicate does it: the prediction's JSON is POSTed to the URL the client
//! gave, for the events it asked for (`start`, `completed`; `output` and `logs` coincide with `completed` here, as
//! outputs are not streamed through webhooks). A delivery that fails (connection error, timeout, non-2xx) is
//! retried with exponential backoff and jitter, up to a fixed number of attempts; each attempt carries the same
//! `webhook-id`, so a receiver can drop duplicates. Deliveries run on their own tasks: a slow receiver never holds
//! up a prediction. With a signing [`Secret`], each attempt is signed as the Standard Webhooks spec (and Replicate)
//! does: `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, so
//! Replicate's client libraries validate Kiln's webhooks unchanged. Each namespace (tenant) has a secret of its
//! own, derived from the gateway's master secret ([`Secret::for_namespace`]): a tenant reads only its own, so no
//! tenant can forge deliveries to another's receiver; rotating the master rotates every namespace's secret.
//!
//! Tenants choose webhook URLs, so a webhook is a request the gateway makes on a tenant's behalf from inside the
//! cluster (server-side request forgery). [`Destinations`] decides where deliveries may go: by default never to
//! loopback, private (RFC 1918, unique-local), link-local (cloud metadata at 169.254.169.254), carrier-grade NAT,
//! multicast, broadcast, unspecified or reserved addresses, nor to ranges the operator denies (the cluster's pod
//! and service ranges); an operator allowlist re-opens chosen ranges. A URL is checked when the prediction is
//! created (its name resolved: a refused address is a 400 saying why) and again at each delivery, where the
//! connector connects only to the addresses it has just resolved and checked, so a name that later resolves to a
//! refused address (DNS rebinding) is not followed. Redirects are never followed.

use std::{
    future::Future,
    hash::{BuildHasher, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::TokioExecutor,
};

type Https = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// Why a webhook URL, address range or secret is refused, or a delivery given up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL names (or resolves to) an address deliveries may not go to.
    #[error("webhook {url:?} is refused: {addr} is {why} (an operator can allow it with --webhook-allow)")]
    Refused {
        /// The URL.
        url: String,
        /// The address.
        addr: IpAddr,
        /// Which kind of address it is.
        why: &'static str,
    },
    /// The host name does not resolve.
    #[error("webhook {url:?}: the host {host} does not resolve: {reason}")]
    Unresolvable {
        /// The URL.
        url: String,
        /// The host.
        host: String,
        /// The resolver's error.
        reason: String,
    },
    /// Not an http(s) URL with a host.
    #[error("webhook {url:?} must be an http:// or https:// URL with a host")]
    NotHttp {
        /// The URL.
        url: String,
    },
    /// An address range ([`Cidr`]) whose address does not parse.
    #[error("{text:?}: not an IP address or CIDR range: {source}")]
    NotAnAddress {
        /// The text given.
        text: String,
        /// Cause.
        #[source]
        source: std::net::AddrParseError,
    },
    /// An address range ([`Cidr`]) whose prefix length is not a number up to the address's bits.
    #[error("{text:?}: bad prefix length")]
    BadPrefix {
        /// The text given.
        text: String,
    },
    /// A signing secret without its `whsec_` prefix.
    #[error("a webhook secret starts with whsec_")]
    SecretPrefix,
    /// A signing secret whose key is not base64.
    #[error("the webhook secret after whsec_ is not base64: {0}")]
    SecretNotBase64(#[source] base64::DecodeError),
    /// A signing secret with too short a key.
    #[error("a webhook secret needs at least 16 key bytes")]
    SecretTooShort,
    /// The delivery's HTTP request could not be built.
    #[error("building the request: {0}")]
    Request(#[source] axum::http::Error),
    /// Every attempt of a delivery failed.
    #[error("{attempts} attempts failed; last: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// What the last attempt got (a status, a connection error and its causes, or a timeout).
        last: String,
    },
}

/// A `Result` with a [`WebhookError`].
pub type Result<T, E = WebhookError> = std::result::Result<T, E>;

/// A range of addresses, `10.0.0.0/8` or `fd00::/8` (a bare address is a single one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = WebhookError;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = s.trim().split_once('/').map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let network: IpAddr =
            addr.parse().map_err(|source| WebhookError::NotAnAddress { text: s.to_owned(), source })?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| WebhookError::BadPrefix { text: s.to_owned() })?,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) IPv6 addresses as the IPv4 address they reach.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let seg = v6.segments();
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        v4 => v4,
    }
}

/// Which kind of address `ip` is, if deliveries to it are refused by default.
fn special(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_private() {
                Some("a private address")
            } else if v4.is_link_local() {
                Some("a link-local address (cloud metadata services live there)")
            } else if a == 100 && (64..128).contains(&b) {
                Some("a carrier-grade NAT (shared) address")
            } else if v4.is_multicast() || v4.is_broadcast() {
                Some("a multicast or broadcast address")
            } else if a == 0 || a >= 240 || (a == 192 && b == 0 && v4.octets()[2] == 0) {
                Some("an unspecified or reserved address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6 == Ipv6Addr::LOCALHOST {
                Some("a loopback address")
            } else if v6 == Ipv6Addr::UNSPECIFIED {
                Some("an unspecified or reserved address")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a private (unique-local) address")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address (cloud metadata services live there)")
            } else if first & 0xff00 == 0xff00 {
                Some("a multicast or broadcast address")
            } else {
                None
            }
        }
    }
}

/// Where webhook deliveries may go: public addresses, less what the operator denies, plus what it allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destinations {
    /// Ranges deliveries may reach even though they are special or denied (an operator's internal receivers).
    pub allow: Vec<Cidr>,
    /// Further ranges to refuse (the cluster's pod and service ranges, when they are public addresses).
    pub deny: Vec<Cidr>,
}

impl Destinations {
    /// Why deliveries to `ip` are refused, `None` if they may go there.
    pub fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow.iter().any(|c| c.contains(ip)) {
            return None;
        }
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Some("in a range the operator denies");
        }
        special(ip)
    }

    /// Checks a URL: its syntax, and every address its host names now.
    pub async fn check(&self, url: &str) -> Result<()> {
        let host = host_of(url)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.check_ip(url, ip);
        }
        let addrs = tokio::net::lookup_host((host.as_str(), 0)).await.map_err(|e| WebhookError::Unresolvable {
            url: url.to_owned(),
            host: host.clone(),
            reason: e.to_string(),
        })?;
        let mut any = false;
        for addr in addrs {
            any = true;
            self.check_ip(url, addr.ip())?;
        }
        if !any {
            return Err(WebhookError::Unresolvable { url: url.to_owned(), host, reason: "no address".into() });
        }
        Ok(())
    }

    fn check_ip(&self, url: &str, ip: IpAddr) -> Result<()> {
        match self.refusal(ip) {
            Some(why) => Err(WebhookError::Refused { url: url.to_owned(), addr: ip, why }),
            None => Ok(()),
        }
    }
}

/// The host of an http(s) URL, without IPv6 brackets.
fn host_of(url: &str) -> Result<String> {
    let not_http = || WebhookError::NotHttp { url: url.to_owned() };
    let uri: axum::http::Uri = url.parse().map_err(|_| not_http())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => {
            Ok(host.trim_start_matches('[').trim_end_matches(']').to_owned())
        }
        _ => Err(not_http()),
    }
}

/// The connector's resolver: resolves a name and keeps only the addresses deliveries may go to, so the connection
/// goes to an address checked just now.
#[derive(Debug, Clone)]
struct GuardedResolver {
    destinations: Arc<Destinations>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let destinations = Arc::clone(&self.destinations);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let mut allowed = Vec::new();
            let mut refused = None;
            for addr in tokio::net::lookup_host((host.as_str(), 0)).await? {
                match destinations.refusal(addr.ip()) {
                    None => allowed.push(addr),
                    Some(why) => refused = Some((addr.ip(), why)),
                }
            }
            match (allowed.is_empty(), refused) {
                (true, Some((ip, why))) => Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves to {ip}, {why}: refused"),
                )),
                (true, None) => Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address"))),
                (false, _) => Ok(allowed.into_iter()),
            }
        })
    }
}

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
    pub fn parse(text: &str) -> Result<Self> {
        use base64::Engine as _;
        let text = text.trim();
        let encoded = text.strip_prefix("whsec_").ok_or(WebhookError::SecretPrefix)?;
        let key = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(WebhookError::SecretNotBase64)?;
        if key.len() < 16 {
            return Err(WebhookError::SecretTooShort);
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

    /// The secret of `namespace`: `whsec_` and HMAC-SHA256(master key, "kiln webhook secret v1" NUL namespace). A
    /// tenant holding its own learns nothing of the master's or another namespace's.
    pub fn for_namespace(&self, namespace: &str) -> Self {
        use base64::Engine as _;
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"kiln webhook secret v1\0");
        mac.update(namespace.as_bytes());
        let key = mac.finalize().into_bytes().to_vec();
        Self { text: format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key)), key }
    }

    /// The capability in a prediction's `urls.stream`: HMAC-SHA256(key, "kiln stream token v1" NUL id), 128 bits as
    /// hex. Clients open that URL without the API key (Replicate's stream URLs are capabilities too); it is stable
    /// across restarts and replicas that share the secret.
    pub fn stream_token(&self, prediction_id: &str) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"kiln stream token v1\0");
        mac.update(prediction_id.as_bytes());
        // Lowercase hex of the first 16 bytes, written into one string (it is made for every prediction).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut token = String::with_capacity(32);
        for b in &mac.finalize().into_bytes()[..16] {
            token.push(char::from(HEX[usize::from(b >> 4)]));
            token.push(char::from(HEX[usize::from(b & 15)]));
        }
        token
    }

    /// Whether `token` is [`Secret::stream_token`] of `prediction_id`, compared in constant time.
    pub fn stream_token_matches(&self, prediction_id: &str, token: &str) -> bool {
        let want = self.stream_token(prediction_id);
        want.len() == token.len() && want.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
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

/// Why a webhook URL is refused at creation, by its syntax alone ([`Destinations::check`] looks at the addresses).
pub fn check_url(url: &str) -> Result<()> {
    host_of(url).map(drop)
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
    /// The master secret: deliveries for a namespace are signed with [`Secret::for_namespace`] of it, when set.
    pub secret: Option<Secret>,
    destinations: Arc<Destinations>,
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
        Self::with_destinations(backoff, attempts, Destinations::default())
    }

    /// A sender delivering only where `destinations` allows.
    pub fn with_destinations(backoff: Duration, attempts: u32, destinations: Destinations) -> Self {
        let destinations = Arc::new(destinations);
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { destinations: Arc::clone(&destinations) });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let provider = rustls::crypto::ring::default_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match builder.with_provider_and_native_roots(provider) {
            Ok(b) => b.https_or_http().enable_http1().wrap_connector(http),
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
                        .wrap_connector(http),
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
            destinations,
            pending: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Where deliveries may go.
    pub fn destinations(&self) -> &Destinations {
        &self.destinations
    }

    /// Sends `body` as JSON to `url` in the background, retrying; `id` identifies the delivery (`webhook-id`);
    /// signed with `namespace`'s secret. A body that does not serialize is logged and not sent.
    pub fn send(&self, url: String, id: String, body: &impl serde::Serialize, namespace: &str) {
        let bytes = match serde_json::to_vec(body) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::warn!(%url, %id, error = %e, "webhook body does not serialize; not sent");
                return;
            }
        };
        let this = self.clone();
        let namespace = namespace.to_owned();
        self.pending.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            match this.deliver(&url, &id, bytes, &namespace).await {
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
    pub async fn deliver(&self, url: &str, id: &str, body: Bytes, namespace: &str) -> Result<u32> {
        let secret = self.secret.as_ref().map(|s| s.for_namespace(namespace));
        // An address in the URL is not resolved, so the connector cannot check it: check it here.
        let host = host_of(url)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.destinations.check_ip(url, ip)?;
        }
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let mut request = axum::http::Request::post(url)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header(axum::http::header::USER_AGENT, "kiln-gateway")
                .header("webhook-id", id);
            if let Some(secret) = &secret {
                let timestamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                request = request
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", secret.sign(id, timestamp, &body));
            }
            let request = request.body(Full::new(body.clone())).map_err(WebhookError::Request)?;
            match tokio::time::timeout(self.timeout, self.client.request(request)).await {
                Ok(Ok(r)) if r.status().is_success() => return Ok(attempt),
                Ok(Ok(r)) => last = format!("status {}", r.status()),
                Ok(Err(e)) => {
                    // The connector's reasons (a refused address) are in the error's sources.
                    last = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(inner) = source {
                        last = format!("{last}: {inner}");
                        source = inner.source();
                    }
                }
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
        Err(WebhookError::GaveUp { attempts: self.attempts, last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tokens_match_an_independent_hmac() {
        // Expected value computed with Python's hmac/hashlib: the first 16 bytes, lowercase hex.
        let secret = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap();
        assert_eq!(secret.stream_token("abc123"), "a2cb314b6a8c3174156bf869a00e8cc6");
        assert!(secret.stream_token_matches("abc123", "a2cb314b6a8c3174156bf869a00e8cc6"));
        assert!(!secret.stream_token_matches("abc124", "a2cb314b6a8c3174156bf869a00e8cc6"));
    }

    #[test]
    fn signatures_match_an_independent_hmac() {
        // Expected value computed with Python's hmac/hashlib/base64, as Replicate's client validates.
        let secret = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap();
        let body = br#"{"id":"x","status":"succeeded"}"#;
        assert_eq!(
            secret.sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1_674_087_231, body),
            "v1,R+Gs9epiJ31XpzDXcPyzq2NdSCFb6RrpuT5wbkpgcz4="
        );
        let no_prefix = Secret::parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap_err();
        assert!(matches!(no_prefix, WebhookError::SecretPrefix) && no_prefix.to_string().contains("whsec_"));
        let not_base64 = Secret::parse("whsec_!!").unwrap_err();
        assert!(matches!(not_base64, WebhookError::SecretNotBase64(_)) && not_base64.to_string().contains("base64"));
        assert!(matches!(Secret::parse("whsec_AAECAwQ="), Err(WebhookError::SecretTooShort)));
        let fresh = Secret::generate().unwrap();
        assert!(fresh.as_str().starts_with("whsec_") && Secret::parse(fresh.as_str()).is_ok());
        assert_ne!(fresh.as_str(), Secret::generate().unwrap().as_str());
    }

    #[test]
    fn each_namespace_has_its_own_stable_secret() {
        let master = Secret::parse("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX").unwrap();
        let (a, b) = (master.for_namespace("team-a"), master.for_namespace("team-b"));
        assert_ne!(a.as_str(), b.as_str());
        assert_ne!(a.as_str(), master.as_str());
        assert_eq!(a.as_str(), master.for_namespace("team-a").as_str(), "stable across restarts and replicas");
        assert!(Secret::parse(a.as_str()).is_ok(), "a valid whsec_ secret for the clients");
        let body = b"{}";
        assert_ne!(a.sign("id", 1, body), b.sign("id", 1, body), "team-a's secret does not sign as team-b");
    }

    #[test]
    fn webhook_urls_must_be_http_or_https_with_a_host() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://[2001:db8::1]:8000/x").is_ok());
        assert!(check_url("ftp://example.com").unwrap_err().to_string().contains("http://"));
        assert!(check_url("not a url").is_err());
        assert!(check_url("/relative").is_err());
    }

    #[test]
    fn loopback_private_link_local_and_denied_ranges_are_refused_unless_allowed() {
        let d = Destinations::default();
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::7f00:1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("fd12::1", "private"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "carrier-grade"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
        ] {
            let why = d.refusal(ip.parse().unwrap()).unwrap_or_else(|| panic!("{ip} should be refused"));
            assert!(why.contains(kind), "{ip}: {why}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1", "172.32.0.1"] {
            assert_eq!(d.refusal(ip.parse().unwrap()), None, "{ip} is public");
        }
        let d = Destinations {
            allow: vec!["10.20.0.0/16".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            deny: vec!["34.118.224.0/20".parse().unwrap()],
        };
        assert_eq!(d.refusal("10.20.3.4".parse().unwrap()), None, "allowed range");
        assert_eq!(d.refusal("127.0.0.1".parse().unwrap()), None, "allowed address");
        assert!(d.refusal("127.0.0.2".parse().unwrap()).is_some());
        assert!(d.refusal("10.21.0.1".parse().unwrap()).is_some());
        assert!(d.refusal("34.118.230.1".parse().unwrap()).unwrap().contains("denies"), "the service range");
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert_eq!(e.to_string(), r#""10.0.0.0/33": bad prefix length"#);
        let e = "nope".parse::<Cidr>().unwrap_err();
        assert!(matches!(&e, WebhookError::NotAnAddress { text, .. } if text == "nope"), "{e}");
        assert!(e.to_string().starts_with(r#""nope": not an IP address or CIDR range: "#), "{e}");
    }

    #[tokio::test]
    async fn urls_are_checked_by_the_addresses_their_names_resolve_to() {
        let d = Destinations::default();
        let e = d.check("http://localhost:9401/admin/gpus/3/reset").await.unwrap_err();
        assert!(matches!(&e, WebhookError::Refused { why, .. } if why.contains("loopback")), "{e}");
        let e = d.check("http://169.254.169.254/latest/meta-data/").await.unwrap_err();
        assert!(e.to_string().contains("link-local"), "{e}");
        assert!(d.check("http://[::1]:80/").await.is_err());
        assert!(d.check("http://8.8.8.8/hook").await.is_ok());
    }

    #[tokio::test]
    async fn a_delivery_to_a_refused_address_is_not_attempted() {
        // A receiver on loopback that would accept: the sender must not reach it, by address or by name.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let sender = Webhooks::new(Duration::from_millis(1), 1);
        for url in [format!("http://127.0.0.1:{port}/x"), format!("http://localhost:{port}/x")] {
            let err = sender.deliver(&url, "id", Bytes::from_static(b"{}"), "ns").await.unwrap_err();
            let text = err.to_string();
            assert!(text.contains("loopback") || text.contains("refused"), "{url}: {text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "no connection was made");
        let mut allowed = Webhooks::with_destinations(
            Duration::from_millis(1),
            1,
            Destinations { allow: vec!["127.0.0.0/8".parse().unwrap()], deny: vec![] },
        );
        allowed.timeout = Duration::from_millis(200);
        let _ = allowed.deliver(&format!("http://localhost:{port}/x"), "id", Bytes::from_static(b"{}"), "ns").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1, "allowed: the receiver was reached");
    }
}
