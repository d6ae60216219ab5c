//! The console in a real browser: headless Chromium (Debian's `chromium`; `KILN_CHROMIUM` names another binary)
//! driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4, so
//! no websocket client is needed), against `kiln up` with 8 simulated GPUs. It signs in with the one-time link the
//! banner prints, sees the 8 GPUs with their states, sends a prediction and watches the request count and the cold
//! start arrive over the event stream, then signs in with a second namespace's key and does not see the first's
//! deployment. Screenshots of each page go to `target/console-screenshots/`.
//!
//! `#[ignore]`d: it needs Chromium (`.ci/run` installs it). Run it with
//! `cargo nextest run -p kiln --test console --run-ignored only`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A headless Chromium driven over `--remote-debugging-pipe`, with one page attached.
struct Browser {
    child: Child,
    commands: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

impl Browser {
    fn launch() -> Self {
        let binary = std::env::var("KILN_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = std::env::temp_dir().join(format!("kiln-console-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        // The shell hands its stdin and stdout to Chromium as fds 3 and 4, the pipe's ends.
        let script = format!(
            "exec \"$0\" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
             --hide-scrollbars --window-size=1400,1000 --user-data-dir='{}' --remote-debugging-pipe about:blank \
             3<&0 4>&1 </dev/null >/dev/null 2>/dev/null",
            profile.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script, &binary])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary} (install Debian's chromium, or set KILN_CHROMIUM): {e}"));
        let commands = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while out.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        let mut b = Self { child, commands, messages, next_id: 0, session: String::new(), _profile: profile };
        let target = b.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = b.call(None, "Target.attachToTarget", json!({ "targetId": target, "flatten": true }));
        b.session = attached["sessionId"].as_str().expect("a session id").to_owned();
        b.page("Page.enable", json!({}));
        b
    }

    /// Sends one command (to the page's session, or the browser's) and waits for its answer.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("the browser's pipe");
        self.commands.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.messages.recv_timeout(left).unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    fn navigate(&mut self, url: &str) {
        self.page("Page.navigate", json!({ "url": url }));
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .page("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }));
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is `want`, within `within`; panics with the last value otherwise.
    fn wait_for(&mut self, expression: &str, want: &Value, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.eval(expression);
            if got == *want {
                return;
            }
            if Instant::now() >= deadline {
                let errors = self.eval("(document.body.dataset.error ?? '') + ' fleet: ' + JSON.stringify(model.fleet) + ' hash ' + location.href");
                panic!("{expression}: {got} after {within:?}, wanted {want} (page errors: {errors})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the viewport, written to `path`.
    fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.page("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().expect("png data")).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs Chromium (.ci/run installs Debian's chromium)"]
fn the_console_shows_the_fleet_live_updates_and_keeps_namespaces_apart() {
    let dir = std::env::temp_dir().join(format!("kiln-console-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        "up",
        "--listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--agent-metrics",
        "127.0.0.1:0",
        "--agent-admin",
        "127.0.0.1:0",
        "--simulate-gpus",
        "h100-80gb:8",
    ];
    // Three keys: namespace default's (the example deployment's), an operator's, and namespace other's.
    let other_key = "kiln_other_namespace_key_0123456789";
    let state = dir.join(".kiln");
    std::fs::create_dir_all(&state).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let keys = format!(
            "- namespace: default\n  key: kiln_default_key_0123456789abcdef\n\
             - namespace: \"*\"\n  key: kiln_operator_key_0123456789abcdef\n\
             - namespace: other\n  key: {other_key}\n"
        );
        std::fs::write(state.join("api-keys.yaml"), keys).unwrap();
        std::fs::set_permissions(state.join("api-keys.yaml"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (_up, text) = common::spawn_kiln(&args, Some(&dir), "/predictions");
    let login = text.lines().find_map(|l| l.split_whitespace().find(|w| w.contains("/ui?token="))).expect(&text);
    let login = login.to_owned();
    let addr = login.trim_start_matches("http://").split('/').next().unwrap().to_owned();
    let base = format!("http://{addr}");
    let key = text.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap().to_owned();
    assert_eq!(key, "kiln_default_key_0123456789abcdef");

    let shots = screenshots();
    let mut b = Browser::launch();

    // The operator's one-time link: the fleet, 8 GPUs, each with a state.
    b.navigate(&login);
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    assert_eq!(b.eval("document.getElementById('who').textContent"), json!("operator"));
    b.wait_for("document.querySelectorAll('#gpus tbody tr').length", &json!(8), Duration::from_secs(10));
    let states = b.eval("[...document.querySelectorAll('#gpus tbody tr .badge')].map(e => e.textContent)");
    let states: Vec<String> = serde_json::from_value(states).unwrap();
    let known = ["free", "busy", "idle-warm", "loading", "rented", "lent", "cordoned", "unhealthy", "offline"];
    assert_eq!(states.len(), 8);
    assert!(states.iter().all(|s| known.contains(&s.as_str())), "{states:?}");
    assert_eq!(b.eval("document.getElementById('count-free').textContent"), json!("8"), "nothing runs yet: {states:?}");
    b.screenshot(&shots.join("1-fleet.png"));
    // The link was for one use.
    let path = login.trim_start_matches(&base);
    assert_eq!(common::http(&addr, "GET", path, &[], "").0, 401, "a login token is single use");

    // The deployment before any request, then a prediction: its count and its cold start arrive live.
    b.navigate(&format!("{base}/ui#deployments"));
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    let row = "document.querySelector('tr[data-name=\"default/mlp-demo\"]')";
    b.wait_for(&format!("{row} && {row}.querySelector('.requests').textContent"), &json!("0"), Duration::from_secs(20));
    let auth = format!("Bearer {key}");
    let headers = [("Authorization", auth.as_str()), ("Prefer", "wait"), ("Content-Type", "application/json")];
    let body = r#"{"input": {"x": [0.5, -1.0, 2.0, 0.25]}}"#;
    let (status, _, answer) =
        common::http(&addr, "POST", "/v1/deployments/default/mlp-demo/predictions", &headers, body);
    assert_eq!(status, 200, "{answer}");
    b.wait_for(&format!("{row}.querySelector('.requests').textContent"), &json!("1"), Duration::from_secs(10));
    b.wait_for(&format!("{row}.querySelector('.coldstarts').textContent"), &json!("1"), Duration::from_secs(10));
    let page = b.eval("document.getElementById('page-deployments').innerText").as_str().unwrap().to_owned();
    assert!(page.contains("last cold start") && page.contains("host→GPU"), "{page}");
    assert!(page.contains("keep-alive"), "{page}");
    // A few seconds of the plots, then the picture.
    std::thread::sleep(Duration::from_secs(3));
    b.screenshot(&shots.join("2-deployments.png"));

    // The fleet now shows the replica's GPU held by the deployment (idle-warm or busy), the rest free.
    b.navigate(&format!("{base}/ui#fleet"));
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    b.wait_for(
        "[...document.querySelectorAll('#gpus tbody tr')].filter(r => r.textContent.includes('default/mlp-demo')).length",
        &json!(1),
        Duration::from_secs(10),
    );
    assert_eq!(b.eval("document.getElementById('count-free').textContent"), json!("7"));
    b.screenshot(&shots.join("3-fleet-serving.png"));
    b.navigate(&format!("{base}/ui#rentals"));
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    b.wait_for("!!document.getElementById('usage')", &json!(true), Duration::from_secs(10));
    b.screenshot(&shots.join("4-rentals-usage.png"));

    // The second namespace's key: signed in by typing it into the page; it sees neither the deployment nor its GPU.
    b.eval("fetch('/ui/logout', {method: 'POST'}).then(() => true)");
    b.navigate(&format!("{base}/ui"));
    b.wait_for("document.body.dataset.state", &json!("login"), Duration::from_secs(20));
    b.eval(&format!(
        "document.getElementById('key').value = '{other_key}'; document.getElementById('login-form').requestSubmit(); true"
    ));
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    assert_eq!(b.eval("document.getElementById('who').textContent"), json!("namespace other"));
    let all = b.eval("document.querySelector('main').textContent").as_str().unwrap().to_owned();
    assert!(!all.contains("mlp-demo"), "namespace other sees default's deployment: {all}");
    assert!(all.contains("No deployments visible to this key"), "{all}");
    assert!(all.contains("0 node(s), 0 GPU(s)"), "{all}");
    b.screenshot(&shots.join("5-other-namespace.png"));
    b.navigate(&format!("{base}/ui#deployments"));
    b.wait_for("document.body.dataset.state", &json!("ready"), Duration::from_secs(20));
    b.screenshot(&shots.join("6-other-namespace-deployments.png"));
    println!("screenshots in {}", shots.display());
}
