//! The replicas end to end in one process: native loads from the cache, failures that leave the others serving,
//! warm starts from resident copies, and non-finite outputs.

use std::time::Duration;

use kiln_proto::v1::model_source::Runtime;

use super::*;
use crate::{
    cache::{Tier, digest_of},
    model::example_model,
};

fn setup(name: &str) -> (Arc<Workers>, std::path::PathBuf) {
    setup_with_host_ram(name, 1 << 30)
}

/// Workers on 8 GPUs of 80 GiB, with a weight cache of 1 GiB of disk and `host` bytes of host RAM.
fn setup_with_host_ram(name: &str, host: u64) -> (Arc<Workers>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("kiln-workers-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 30, host).unwrap());
    (Workers::new(cache, None, vec![80 << 30; 8]), dir)
}

fn start(replica: &str, uri: &str, digest: &str) -> v1::StartWorker {
    v1::StartWorker {
        replica_id: replica.into(),
        deployment: "ns/m".into(),
        model: Some(v1::ModelSource {
            uri: uri.into(),
            digest: digest.into(),
            runtime: Some(Runtime::Native(v1::NativeRuntime::default())),
            ..Default::default()
        }),
        max_concurrency: 2,
        gpu_indexes: vec![0],
        gpu_uuids: vec!["GPU-0".into()],
        ..Default::default()
    }
}

async fn until_done(events: &mut broadcast::Receiver<v1::WorkerEvent>, replica: &str) -> Event {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
        if e.replica_id == replica && matches!(e.event, Some(Event::Ready(_) | Event::Failed(_))) {
            return e.event.unwrap();
        }
    }
}

#[tokio::test]
async fn a_native_replica_loads_answers_and_a_truncated_one_fails_without_disturbing_it() {
    let (workers, dir) = setup("native");
    let bytes = example_model(7, &[4, 8, 3]);
    let good = dir.join("good.safetensors");
    std::fs::write(&good, &bytes).unwrap();
    let mut events = workers.subscribe();
    let (status, _) = workers.start("c1", start("r1", &format!("file://{}", good.display()), &digest_of(&bytes)));
    assert_eq!(status, v1::AckStatus::Accepted);
    let Event::Ready(ready) = until_done(&mut events, "r1").await else { panic!("r1 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Remote as i32, "fetched into the cache on a miss");
    assert_eq!(ready.max_concurrency, 2);
    let (out, _) = workers.predict("r1", br#"{"input": [0.1, 0.2, 0.3, 0.4]}"#).await.unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["output"].as_array().unwrap().len(), 3);
    let err = workers.predict("r1", br#"{"input": [1.0]}"#).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A truncated file: the start fails with a clear event, r1 keeps serving.
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    workers.start("c2", start("r2", &format!("file://{}", bad.display()), ""));
    let Event::Failed(f) = until_done(&mut events, "r2").await else { panic!("r2 should fail") };
    assert_eq!(f.reason, "InvalidWeights");
    assert!(!f.retryable);
    assert!(f.message.contains("not a valid safetensors file"), "{}", f.message);
    assert!(workers.predict("r1", br#"{"input": [[0,0,0,0]]}"#).await.is_ok());
    assert_eq!(workers.predict("r2", b"{}").await.unwrap_err().code(), tonic::Code::Unavailable);

    // The same replica twice is not started twice; stopping it is idempotent.
    assert_eq!(workers.start("c3", start("r1", "file:///x", "")).0, v1::AckStatus::AlreadyDone);
    let stop = v1::StopWorker { replica_id: "r1".into(), grace_period_ms: 100, keep_weights_resident: true };
    assert_eq!(workers.stop(&stop).await.0, v1::AckStatus::Done);
    assert_eq!(workers.stop(&stop).await.0, v1::AckStatus::AlreadyDone);
    assert!(workers.running().is_empty());
    assert_eq!(workers.resident_copies().len(), 1, "the weights stayed resident");

    // The same model again on the same GPU: a warm start from the resident copy.
    let uri = format!("file://{}", good.display());
    workers.start("c4", start("r4", &uri, &digest_of(&bytes)));
    let Event::Ready(ready) = until_done(&mut events, "r4").await else { panic!("r4 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Gpu as i32);
    assert!(workers.resident_copies().is_empty());
    assert!(workers.predict("r4", br#"{"input": [1, 2, 3, 4]}"#).await.is_ok());
    // Evicting a model's resident copies.
    workers.stop(&v1::StopWorker { replica_id: "r4".into(), keep_weights_resident: true, ..Default::default() }).await;
    assert_eq!(workers.evict_resident(&uri, Some(0)), 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// Weights leaving the GPU go to the host-RAM tier: a replica stopped without keeping its weights resident, and
/// an idle copy evicted to make room for another model; the next start of the model then comes from host RAM.
#[tokio::test]
async fn weights_leaving_the_gpu_are_kept_in_host_ram() {
    let dir = std::env::temp_dir().join(format!("kiln-workers-demote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = Arc::new(WeightCache::open(&dir.join("cache"), 1 << 30, 1 << 30).unwrap());
    let uri = |name: &str, seed: u64| {
        let path = dir.join(name);
        std::fs::write(&path, example_model(seed, &[4, 64, 3])).unwrap();
        format!("file://{}", path.display())
    };
    let (a, b) = (uri("a.safetensors", 1), uri("b.safetensors", 2));
    let in_host = |uri: &str| cache.report().iter().any(|e| e.uri == uri && e.tier == Tier::HostRam);
    let until_in_host = |uri: String| {
        let cache = Arc::clone(&cache);
        async move {
            for _ in 0..500 {
                if cache.report().iter().any(|e| e.uri == uri && e.tier == Tier::HostRam) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{uri} never reached host RAM");
        }
    };
    // GPU 0 holds one model's worth beside nothing else: a second model evicts the first's idle copy.
    let size = example_model(1, &[4, 64, 3]).len() as u64;
    let workers = Workers::new(Arc::clone(&cache), None, vec![size + size / 2]);
    let mut events = workers.subscribe();

    workers.start("c1", start("r1", &a, ""));
    let Event::Ready(ready) = until_done(&mut events, "r1").await else { panic!("r1 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Remote as i32);
    assert!(!in_host(&a));
    workers.stop(&v1::StopWorker { replica_id: "r1".into(), keep_weights_resident: false, ..Default::default() }).await;
    until_in_host(a.clone()).await;
    workers.start("c2", start("r2", &a, ""));
    let Event::Ready(ready) = until_done(&mut events, "r2").await else { panic!("r2 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Host as i32, "the next start reads host RAM");

    // b: kept resident on GPU 0 when stopped, then evicted to make room for a; it goes to host RAM.
    workers.stop(&v1::StopWorker { replica_id: "r2".into(), keep_weights_resident: false, ..Default::default() }).await;
    workers.start("c3", start("r3", &b, ""));
    let Event::Ready(_) = until_done(&mut events, "r3").await else { panic!("r3 failed") };
    workers.stop(&v1::StopWorker { replica_id: "r3".into(), keep_weights_resident: true, ..Default::default() }).await;
    assert_eq!(workers.resident_copies().len(), 1);
    assert!(!in_host(&b), "an idle GPU copy is not also put in host RAM");
    let mut r4 = start("r4", &a, "");
    r4.gpu_memory_bytes = size;
    workers.start("c4", r4);
    let Event::Ready(_) = until_done(&mut events, "r4").await else { panic!("r4 failed") };
    assert!(workers.resident_copies().is_empty(), "b's idle copy made room");
    until_in_host(b.clone()).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// On a GPU: a replica stopped without keeping its weights leaves them in the host-RAM tier, pinned; the next
/// start copies them straight from there and answers as the first did.
#[tokio::test]
#[ignore = "needs an NVIDIA GPU: KILN_TEST_CUDA=1 cargo nextest run -p kiln-agent --run-ignored only cuda"]
async fn cuda_replicas_come_back_from_pinned_host_ram() {
    assert!(
        std::env::var("KILN_TEST_CUDA").is_ok_and(|v| v == "1") && crate::cuda::available(),
        "set KILN_TEST_CUDA=1 on a machine with CUDA"
    );
    let (workers, dir) = setup("cuda-host");
    workers.cache.set_pinner(crate::cache::Pinner(Arc::new(crate::cuda::pin_host)));
    let path = dir.join("m.safetensors");
    std::fs::write(&path, example_model(5, &[4, 256, 3])).unwrap();
    let uri = format!("file://{}", path.display());
    let mut events = workers.subscribe();
    let input = br#"{"input": [0.5, -1.0, 2.0, 0.25]}"#;
    workers.start("c1", start("r1", &uri, ""));
    let Event::Ready(ready) = until_done(&mut events, "r1").await else { panic!("r1 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Remote as i32);
    let (first, _) = workers.predict("r1", input).await.unwrap();
    workers.stop(&v1::StopWorker { replica_id: "r1".into(), keep_weights_resident: false, ..Default::default() }).await;
    let mut pinned = None;
    for _ in 0..500 {
        if let Ok(found) = workers.cache.locate(&uri, None)
            && let crate::cache::Weights::Host(bytes) = &found.weights
        {
            pinned = Some(bytes.is_pinned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pinned, Some(true), "the weights reached host RAM, pinned");
    workers.start("c2", start("r2", &uri, ""));
    let Event::Ready(ready) = until_done(&mut events, "r2").await else { panic!("r2 failed") };
    assert_eq!(ready.source_tier, v1::CacheTier::Host as i32);
    assert_eq!(workers.predict("r2", input).await.unwrap().0, first);
    std::fs::remove_dir_all(&dir).ok();
}

/// A model whose weights overflow f32 (3e38 · 1 + 3e38 · 2 = inf):
/// the prediction fails with INTERNAL naming the output index, instead of succeeding with `null`s; over the
/// `WorkerService` the gateway gets the same status. An input beyond f32 is the caller's error.
#[tokio::test]
async fn non_finite_outputs_fail_the_prediction_and_name_the_index() {
    use crate::model::{Activation, Dtype, LayerSpec, write_model};

    let (workers, dir) = setup("overflow");
    // outputs: [x0, 3e38·x0 + 3e38·x1]
    let layers = vec![LayerSpec::new(vec![1.0, 0.0, 3.0e38, 3.0e38], vec![], 2, 2)];
    let bytes = write_model(&layers, Activation::Identity, Dtype::F32);
    let path = dir.join("overflow.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let mut events = workers.subscribe();
    workers.start("c1", start("r1", &format!("file://{}", path.display()), &digest_of(&bytes)));
    let Event::Ready(_) = until_done(&mut events, "r1").await else { panic!("r1 failed") };

    // In range: an answer.
    let (out, _) = workers.predict("r1", br#"{"input": [1.0, 0.0]}"#).await.unwrap();
    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let values: Vec<f32> = serde_json::from_value(out["output"].clone()).unwrap();
    assert_eq!(values, [1.0, 3.0e38]);
    // Overflow: a failure naming the index.
    let err = workers.predict("r1", br#"{"input": [1.0, 2.0]}"#).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    assert_eq!(
        err.message(),
        "the model produced a non-finite value (inf) at output index 1: NaN or infinity, e.g. from a numeric overflow"
    );
    // In a batch, the row too; the counter of completed predictions leaves failures out.
    let err = workers.predict("r1", br#"{"input": [[1, 0], [0, -2], [0, 1]]}"#).await.unwrap_err();
    assert!(err.message().contains("(-inf) at output row 1, index 1"), "{}", err.message());
    // An input beyond f32 is invalid input, not a model failure.
    let err = workers.predict("r1", br#"{"input": [1e39, 0]}"#).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("input index 0 is out of the range of a 32-bit float"), "{}", err.message());

    // Over gRPC, as the gateway calls it, on the worker port as the node serves it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::node::serve_worker(listener, WorkerApi(Arc::clone(&workers)).router()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = v1::worker_service_client::WorkerServiceClient::new(channel);
    let request = |input: &[u8]| v1::PredictRequest {
        replica_id: "r1".into(),
        input: input.to_vec(),
        content_type: "application/json".into(),
        ..Default::default()
    };
    let status = client.predict(request(br#"{"input": [1.0, 2.0]}"#)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("non-finite value (inf) at output index 1"), "{}", status.message());
    let ok = client.predict(request(br#"{"input": [1.0, 0.0]}"#)).await.unwrap().into_inner();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&ok.output).unwrap()["output"][0], 1.0);

    // The same port answers the same call over plain HTTP/1.1, failures with their gRPC code.
    let http = |replica: Option<&str>, input: &str| {
        let replica = replica.map(|r| format!("x-kiln-replica: {r}\r\n")).unwrap_or_default();
        let request = format!(
            "POST /v1/predict HTTP/1.1\r\nhost: w\r\n{replica}content-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{input}",
            input.len()
        );
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            let status: u16 = head[9..12].parse().unwrap();
            let code = head.lines().find_map(|l| l.strip_prefix("x-kiln-status: ")).map(str::to_owned);
            let status = kiln_proto::worker_http::status_of(status, code.as_deref(), body.as_bytes());
            (head.starts_with("HTTP/1.1 200 "), status, body.to_owned())
        }
    };
    let (ok, _, body) = http(Some("r1"), r#"{"input": [1.0, 0.0]}"#).await;
    assert!(ok, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["output"][0], 1.0);
    let (ok, status, _) = http(Some("r1"), r#"{"input": [1.0, 2.0]}"#).await;
    assert!(!ok);
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("non-finite value (inf) at output index 1"), "{}", status.message());
    let (_, status, _) = http(Some("gone"), r#"{"input": [1.0]}"#).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{}", status.message());
    let (_, status, _) = http(None, r#"{"input": [1.0]}"#).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_process_port_above_65535_is_refused() {
    let (workers, dir) = setup("port");
    let mut s = start("p1", "file:///x", "");
    let process = v1::ProcessRuntime { command: vec!["true".into()], port: 70_000, ..Default::default() };
    s.model.as_mut().unwrap().runtime = Some(v1::model_source::Runtime::Process(process));
    let (status, message) = workers.start("c1", s);
    assert_eq!(status, v1::AckStatus::Rejected, "{message}");
    assert!(message.contains("70000"), "{message}");
    assert!(workers.running().is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

/// The cold start's source tier says the truth (the source, then the disk cache, with or without a digest in the
/// spec), its phases add up to the total, and a start from the disk cache hashes nothing.
#[tokio::test]
async fn cold_starts_report_their_tier_truthfully_and_phases_that_add_up() {
    use crate::model::{Activation, Dtype, LayerSpec, write_model};
    // No host RAM tier: stopped replicas' weights stay on disk only, so every later start reads the disk cache.
    let (workers, dir) = setup_with_host_ram("tiers", 0);
    // A model big enough (4 MiB of F16) that reading and converting take measurable time.
    let layers: Vec<LayerSpec> = (0..2)
        .map(|l| LayerSpec::new(vec![0.001 * (l + 1) as f32; 1024 * 1024], vec![0.5; 1024], 1024, 1024))
        .collect();
    let bytes = write_model(&layers, Activation::Relu, Dtype::F16);
    let path = dir.join("m.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let uri = format!("file://{}", path.display());
    let mut events = workers.subscribe();
    let mut tiers = Vec::new();
    for (i, digest) in ["", "", &digest_of(&bytes)].into_iter().enumerate() {
        let id = format!("r{i}");
        workers.start(&format!("c{i}"), start(&id, &uri, digest));
        let Event::Ready(ready) = until_done(&mut events, &id).await else { panic!("{id} failed") };
        let t = ready.timings.unwrap();
        assert_eq!(t.fetch_ms + t.read_ms + t.host_to_device_ms + t.init_ms, t.total_ms, "{t:?}");
        assert!(t.read_ms + t.host_to_device_ms > 0, "reading and converting 4 MiB takes time: {t:?}");
        assert_eq!(ready.gpu_memory_bytes, 2 * (1024 * 1024 + 1024) * 4);
        tiers.push(ready.source_tier);
        workers.stop(&v1::StopWorker { replica_id: id, ..Default::default() }).await;
    }
    let (remote, disk) = (v1::CacheTier::Remote as i32, v1::CacheTier::Disk as i32);
    assert_eq!(tiers, vec![remote, disk, disk]);
    assert_eq!(workers.cache.stats().hashed_bytes(), bytes.len() as u64, "only the first start hashed");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn phases_round_so_that_they_add_up_to_the_total() {
    let began = std::time::Instant::now() - Duration::from_micros(10_700);
    let mut p = native::Phases::new(began);
    let a = p.advance(Duration::from_micros(2_600));
    let b = p.advance(Duration::from_micros(2_600));
    let c = p.next();
    assert_eq!((a, b), (3, 2), "2.6 ms rounds to 3, then 5.2 to 5");
    assert_eq!(a + b + c, p.total());
    assert!(p.total() >= 11);
    // A phase can never claim time that has not passed.
    let mut q = native::Phases::new(std::time::Instant::now());
    assert_eq!(q.advance(Duration::from_secs(5)), 0);
}

#[test]
fn cuda_failures_that_retrying_cannot_fix_are_not_retryable() {
    use crate::cuda::{CudaError, CudaErrorKind};
    let stub = CudaError::classify("DriverError(CUDA_ERROR_STUB_LIBRARY, \"CUDA driver is a stub library\")");
    let oom = CudaError::classify("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
    let blas_oom = CudaError::classify("CublasError(CUBLAS_STATUS_ALLOC_FAILED)");
    let no_device = CudaError::classify("DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")");
    let launch = CudaError::classify("DriverError(CUDA_ERROR_LAUNCH_TIMEOUT, \"launch timed out\")");
    assert_eq!(
        [&stub, &oom, &blas_oom, &no_device, &launch].map(CudaError::kind),
        [
            CudaErrorKind::Unavailable,
            CudaErrorKind::OutOfMemory,
            CudaErrorKind::OutOfMemory,
            CudaErrorKind::Unavailable,
            CudaErrorKind::Other
        ]
    );
    assert_eq!(native::cuda_failure(&stub), ("CudaUnavailable", false));
    assert_eq!(native::cuda_failure(&oom), ("OutOfMemory", false));
    assert_eq!(native::cuda_failure(&CudaError::new(CudaErrorKind::InvalidWeights, "x")), ("InvalidWeights", false));
    assert_eq!(native::cuda_failure(&launch), ("CudaError", true));
    assert!(stub.to_string().contains("CUDA_ERROR_STUB_LIBRARY"), "the message keeps the driver's words");
}

/// A stand-in Cog model server on a loopback port: `GET /health-check` answers 200; `POST /predictions` with
/// `Accept: text/event-stream` streams `start`, three `output` events and `completed` in HTTP chunks, holding the
/// last output until `release` fires (so a test can see the first ones arrive before it is produced); without that
/// header (or on `/plain`, which refuses to stream with 406) it answers the whole prediction as JSON; `/fails`
/// streams one output, then a failed `completed`.
async fn cog_server(release: Arc<tokio::sync::Notify>) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = n.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).await.unwrap();
                let mut stream = reader.into_inner();
                let sse = head.contains("Accept: text/event-stream");
                let send_chunk = |text: String| format!("{:x}\r\n{text}\r\n", text.len());
                if head.starts_with("GET /health-check") {
                    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                } else if head.starts_with("POST /plain") && sse {
                    stream.write_all(b"HTTP/1.1 406 Not Acceptable\r\nContent-Length: 0\r\n\r\n").await.unwrap();
                } else if !sse {
                    let json = r#"{"status":"succeeded","output":["whole"]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                        json.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                } else {
                    let fails = head.starts_with("POST /fails");
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await
                        .unwrap();
                    let start = "event: start\ndata: {\"status\":\"processing\"}\n\n".to_owned();
                    stream.write_all(send_chunk(start).as_bytes()).await.unwrap();
                    let tokens = if fails { 1 } else { 2 };
                    for i in 0..tokens {
                        // One event split over two HTTP chunks, with a comment and CRLF line ends.
                        let event =
                            format!(": tick\r\nevent: output\r\ndata: {{\"chunk\":\"t{i}\",\"index\":{i}}}\r\n\r\n");
                        let (a, b) = event.split_at(20);
                        stream.write_all(send_chunk(a.to_owned()).as_bytes()).await.unwrap();
                        stream.write_all(send_chunk(b.to_owned()).as_bytes()).await.unwrap();
                    }
                    if fails {
                        let done = "event: completed\ndata: {\"status\":\"failed\",\"error\":\"out of tokens\"}\n\n";
                        stream.write_all(send_chunk(done.to_owned()).as_bytes()).await.unwrap();
                    } else {
                        release.notified().await;
                        let last = "event: output\ndata: {\"chunk\":\"t2\",\"index\":2}\n\nevent: completed\n\
                                    data: {\"status\":\"succeeded\",\"output\":[\"t0\",\"t1\",\"t2\"]}\n\n";
                        stream.write_all(send_chunk(last.to_owned()).as_bytes()).await.unwrap();
                    }
                    stream.write_all(b"0\r\n\r\n").await.unwrap();
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    port
}

/// A process replica whose model server streams (Cog's server-sent events) answers `PredictStream` with each
/// output as it is produced, then the whole prediction; one that does not stream answers in one final chunk; a
/// failure reported in the stream fails the call; the slot is held until the stream ends.
#[tokio::test]
async fn a_streaming_process_replica_sends_each_output_as_it_is_produced() {
    use tokio_stream::StreamExt;
    let (workers, dir) = setup("stream");
    let release = Arc::new(tokio::sync::Notify::new());
    let port = cog_server(Arc::clone(&release)).await;
    let mut s = start("p1", "file:///x", "");
    let process = v1::ProcessRuntime {
        command: vec!["sleep".into(), "60".into()],
        port: u32::from(port),
        readiness_path: "/health-check".into(),
        ..Default::default()
    };
    s.model.as_mut().unwrap().runtime = Some(Runtime::Process(process));
    s.max_concurrency = 1;
    let mut events = workers.subscribe();
    assert_eq!(workers.start("c1", s).0, v1::AckStatus::Accepted);
    assert!(matches!(until_done(&mut events, "p1").await, Event::Ready(_)));

    let input = br#"{"input":{"prompt":"hi"}}"#;
    let mut chunks = workers.predict_stream("p1", "pred".into(), input, "application/json", None).await.unwrap();
    let next = |c: Option<Result<v1::PredictChunk, tonic::Status>>| c.unwrap().unwrap();
    let first = next(tokio::time::timeout(Duration::from_secs(5), chunks.next()).await.unwrap());
    let second = next(chunks.next().await);
    assert_eq!((first.index, first.data.as_slice(), first.r#final), (0, &b"\"t0\""[..], false));
    assert_eq!((second.index, second.data.as_slice(), second.prediction_id.as_str()), (1, &b"\"t1\""[..], "pred"));
    // The last output is not produced yet: the replica's one slot is still taken.
    let busy = workers.predict_with("p1", input, "application/json", None).await.unwrap_err();
    assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
    release.notify_one();
    let third = next(chunks.next().await);
    assert_eq!((third.index, third.data.as_slice()), (2, &b"\"t2\""[..]));
    let last = next(chunks.next().await);
    assert!(last.r#final && last.metrics.is_some());
    let whole: serde_json::Value = serde_json::from_slice(&last.data).unwrap();
    assert_eq!(whole["output"], serde_json::json!(["t0", "t1", "t2"]));
    assert!(chunks.next().await.is_none());
    assert_eq!(workers.metrics()[0].completed, 1, "counted once, when it completed");

    // A model that does not stream: 406, asked again for JSON, one final chunk.
    let path = Some("/plain");
    let mut chunks = workers.predict_stream("p1", "pred".into(), input, "application/json", path).await.unwrap();
    let only = next(chunks.next().await);
    assert!(only.r#final);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&only.data).unwrap()["output"][0], "whole");
    assert!(chunks.next().await.is_none());

    // A failure in the stream: the output so far, then the error.
    let path = Some("/fails");
    let mut chunks = workers.predict_stream("p1", "pred".into(), input, "application/json", path).await.unwrap();
    assert_eq!(next(chunks.next().await).data, b"\"t0\"");
    let failed = chunks.next().await.unwrap().unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal);
    assert!(failed.message().contains("out of tokens"), "{}", failed.message());
    assert!(chunks.next().await.is_none());
    assert_eq!(workers.metrics()[0].in_flight, 0, "every slot given back");
    workers.stop(&v1::StopWorker { replica_id: "p1".into(), grace_period_ms: 100, ..Default::default() }).await;
    std::fs::remove_dir_all(&dir).ok();
}
