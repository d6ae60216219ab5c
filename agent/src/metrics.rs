//! Prometheus metrics of the agent, in the Prometheus text format that dcgm-exporter serves.
//!
//! GPU series use dcgm-exporter's names, units and labels (`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`,
//! `Hostname`), so existing GPU dashboards and alerts work unchanged: `DCGM_FI_DEV_GPU_UTIL` (%),
//! `DCGM_FI_DEV_MEM_COPY_UTIL` (%), `DCGM_FI_DEV_FB_USED` / `_FREE` (MiB), `DCGM_FI_DEV_GPU_TEMP` (°C),
//! `DCGM_FI_DEV_POWER_USAGE` (W), `DCGM_FI_DEV_SM_CLOCK` (MHz), `DCGM_FI_DEV_XID_ERRORS` (the last Xid),
//! ECC totals and PCIe throughput. A GPU that cannot be read has no value for those series (as dcgm-exporter
//! behaves) while `kiln_agent_gpu_health` keeps saying why. Agent series are under `kiln_agent_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    telemetry::{Health, Snapshot},
    workers::ReplicaMetrics,
};

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;
type Series = Family<Labels, Gauge<f64, AtomicU64>>;

/// What the workers and the weight cache add to the page.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Per replica.
    pub workers: Vec<ReplicaMetrics>,
    /// Per cache tier.
    pub cache: Vec<CacheTierMetrics>,
    /// The weight cache's counters (bytes hashed by purpose, hits, misses, evictions of corrupt entries).
    pub cache_stats: Option<crate::cache::CacheStats>,
}

/// One weight-cache tier, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTierMetrics {
    /// The `tier` label, e.g. `host_ram`.
    pub tier: &'static str,
    /// Models held.
    pub entries: usize,
    /// Bytes held.
    pub bytes: u64,
    /// Capacity, bytes.
    pub capacity: u64,
}

/// Every metric family the page can hold (gauges, and the cache's two counters), whether or not it has a series now: what dashboards may
/// query. A test renders a page with every family populated and checks it against this list.
pub const FAMILIES: &[&str] = &[
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
    "kiln_agent_gpu_health",
    "kiln_agent_gpu_xid_events",
    "kiln_agent_info",
    "kiln_agent_gpu_samples",
    "kiln_agent_gpu_sample_duration_seconds",
    "kiln_agent_workers",
    "kiln_agent_worker_in_flight",
    "kiln_agent_worker_completed",
    "kiln_agent_cache_entries",
    "kiln_agent_cache_bytes",
    "kiln_agent_cache_capacity_bytes",
    "kiln_agent_cache_hashed_bytes_total",
    "kiln_agent_cache_events_total",
];

/// The metrics page for `snapshot`.
pub fn render(snapshot: &Snapshot) -> String {
    render_with(snapshot, &Extra::default())
}

/// The metrics page for `snapshot`, with worker and cache series.
pub fn render_with(snapshot: &Snapshot, extra: &Extra) -> String {
    let mut registry = Registry::default();
    let mut family = |name: &str, help: &str| {
        debug_assert!(FAMILIES.contains(&name), "{name} is missing from FAMILIES");
        let f = Series::default();
        registry.register(name, help, f.clone());
        f
    };
    let util = family("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).");
    let copy = family("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).");
    let fb_used = family("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).");
    let fb_free = family("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).");
    let temp = family("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).");
    let power = family("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).");
    let power_limit = family("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (in W).");
    let sm_clock = family("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).");
    let xid = family("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.");
    let sbe = family("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors.");
    let dbe = family("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors.");
    let tx = family("DCGM_FI_PROF_PCIE_TX_BYTES", "The rate of data transmitted over the PCIe bus (in bytes/s).");
    let rx = family("DCGM_FI_PROF_PCIE_RX_BYTES", "The rate of data received over the PCIe bus (in bytes/s).");
    let health = family("kiln_agent_gpu_health", "GPU health: 0 healthy, 1 degraded, 2 unhealthy (takes no work).");
    let xids = family("kiln_agent_gpu_xid_events", "Xid errors seen since the agent started, by code.");
    let info = family("kiln_agent_info", "The agent: 1, with whether its GPUs are simulated and the driver version.");
    let samples = family("kiln_agent_gpu_samples", "GPU telemetry samples taken.");
    let sample_seconds = family("kiln_agent_gpu_sample_duration_seconds", "Duration of the last GPU sample.");

    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    for gpu in &snapshot.gpus {
        let labels: Labels = vec![
            ("gpu", gpu.info.index.to_string()),
            ("UUID", gpu.info.uuid.clone()),
            ("pci_bus_id", gpu.info.pci_bus_id.clone()),
            ("device", format!("nvidia{}", gpu.info.index)),
            ("modelName", gpu.info.name.clone()),
            ("Hostname", snapshot.node.clone()),
        ];
        let s = &gpu.sample;
        let set = |f: &Series, v: Option<f64>| {
            if let Some(v) = v {
                f.get_or_create(&labels).set(v);
            }
        };
        set(&util, s.sm_util_pct.map(f64::from));
        set(&copy, s.mem_util_pct.map(f64::from));
        set(&fb_used, s.memory_used_bytes.map(mib));
        set(&fb_free, s.memory_free_bytes.map(mib));
        set(&temp, s.temperature_c.map(f64::from));
        set(&power, s.power_mw.map(|mw| f64::from(mw) / 1000.0));
        set(&power_limit, s.power_limit_mw.map(|mw| f64::from(mw) / 1000.0));
        set(&sm_clock, s.sm_clock_mhz.map(f64::from));
        set(&sbe, s.ecc_corrected_total.map(|v| v as f64));
        set(&dbe, s.ecc_uncorrected_total.map(|v| v as f64));
        set(&tx, s.pcie_tx_bytes_per_sec.map(|v| v as f64));
        set(&rx, s.pcie_rx_bytes_per_sec.map(|v| v as f64));
        set(&xid, Some(f64::from(gpu.last_xid)));
        let state = match gpu.health {
            Health::Healthy => 0.0,
            Health::Degraded => 1.0,
            Health::Unhealthy => 2.0,
        };
        set(&health, Some(state));
        for &(code, count) in &gpu.xid_counts {
            let mut l = labels.clone();
            l.push(("xid", code.to_string()));
            xids.get_or_create(&l).set(count as f64);
        }
    }
    let agent: Labels = vec![
        ("Hostname", snapshot.node.clone()),
        ("simulated", snapshot.simulated.to_string()),
        ("driver_version", snapshot.driver_version.clone()),
    ];
    info.get_or_create(&agent).set(1.0);
    samples.get_or_create(&vec![("Hostname", snapshot.node.clone())]).set(snapshot.samples as f64);
    sample_seconds.get_or_create(&vec![("Hostname", snapshot.node.clone())]).set(snapshot.last_sample.as_secs_f64());

    let replicas = family("kiln_agent_workers", "Replicas on this node by phase (loading, ready).");
    let in_flight = family("kiln_agent_worker_in_flight", "Requests in flight per replica.");
    let completed = family("kiln_agent_worker_completed", "Requests completed per replica since it started.");
    let cache_entries = family("kiln_agent_cache_entries", "Models in the weight cache, by tier.");
    let cache_bytes = family("kiln_agent_cache_bytes", "Bytes in the weight cache, by tier.");
    let cache_capacity = family("kiln_agent_cache_capacity_bytes", "Capacity of the weight cache, by tier.");
    let host = || ("Hostname", snapshot.node.clone());
    for phase in ["loading", "ready"] {
        let n = extra.workers.iter().filter(|w| w.ready == (phase == "ready")).count();
        replicas.get_or_create(&vec![host(), ("phase", phase.to_owned())]).set(n as f64);
    }
    for w in &extra.workers {
        let labels = vec![host(), ("replica", w.replica.clone()), ("deployment", w.deployment.clone())];
        in_flight.get_or_create(&labels).set(f64::from(w.in_flight));
        completed.get_or_create(&labels).set(w.completed as f64);
    }
    for c in &extra.cache {
        let labels = vec![host(), ("tier", c.tier.to_owned())];
        cache_entries.get_or_create(&labels).set(c.entries as f64);
        cache_bytes.get_or_create(&labels).set(c.bytes as f64);
        cache_capacity.get_or_create(&labels).set(c.capacity as f64);
    }

    if let Some(stats) = &extra.cache_stats {
        type Counters = Family<Labels, Counter<u64>>;
        let hashed = Counters::default();
        registry.register(
            "kiln_agent_cache_hashed_bytes",
            "Bytes the weight cache hashed, by purpose: fetch (once per entry created), adopted (first use of an \
             entry without a sidecar), scrub (background integrity checks). A cache hit adds nothing.",
            hashed.clone(),
        );
        let events = Counters::default();
        registry.register(
            "kiln_agent_cache_events",
            "Weight cache events: hit, miss (fetched from the source), evicted_corrupt, scrubbed.",
            events.clone(),
        );
        for (purpose, n) in [
            ("fetch", stats.hashed_fetch_bytes),
            ("adopted", stats.hashed_adopted_bytes),
            ("scrub", stats.hashed_scrub_bytes),
        ] {
            hashed.get_or_create(&vec![host(), ("purpose", purpose.to_owned())]).inc_by(n);
        }
        for (event, n) in [
            ("hit", stats.hits),
            ("miss", stats.misses),
            ("evicted_corrupt", stats.evicted_corrupt),
            ("scrubbed", stats.scrubbed_entries),
        ] {
            events.get_or_create(&vec![host(), ("event", event.to_owned())]).inc_by(n);
        }
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{gpu::sim::SimulatedGpus, telemetry::Telemetry};

    #[test]
    fn dcgm_series_for_every_gpu_and_xid_79_shows() {
        let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:8").unwrap();
        let handle = gpus.handle();
        handle.set_load(2, 40 << 30, 1).unwrap();
        let t = Telemetry::new("node-a", &gpus);
        t.tick(&mut gpus, true);
        let page = render(&t.read());
        for name in ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_XID_ERRORS"] {
            let lines = page.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count();
            assert_eq!(lines, 8, "{name}: {page}");
        }
        let uuid = t.read().gpus[2].info.uuid.clone();
        let used = page
            .lines()
            .find(|l| l.starts_with("DCGM_FI_DEV_FB_USED{") && l.contains(uuid.as_str()))
            .expect("GPU 2's framebuffer line");
        assert!(used.contains("gpu=\"2\"") && used.contains("modelName=\"NVIDIA H100 80GB HBM3\""), "{used}");
        assert!(used.contains("Hostname=\"node-a\"") && used.ends_with(" 40960.0"), "{used}");
        assert!(page.contains("# TYPE DCGM_FI_DEV_GPU_UTIL gauge"));

        handle.inject_xid(3, 79).unwrap();
        t.tick(&mut gpus, true);
        let page = render(&t.read());
        let line = |name: &str| {
            page.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains("gpu=\"3\"")).map(str::to_owned)
        };
        assert!(line("DCGM_FI_DEV_XID_ERRORS").unwrap().ends_with(" 79.0"));
        assert!(line("kiln_agent_gpu_health").unwrap().ends_with(" 2.0"));
        assert!(line("kiln_agent_gpu_xid_events").unwrap().contains("xid=\"79\""));
        assert_eq!(line("DCGM_FI_DEV_FB_USED"), None, "a GPU off the bus cannot be read");
    }

    /// With every family populated (a worker, a cache tier, an Xid), the page's families are exactly [`FAMILIES`].
    #[test]
    fn the_family_list_is_exactly_what_the_page_holds() {
        let mut gpus = SimulatedGpus::new("node-a", "h100-80gb:2").unwrap();
        gpus.handle().inject_xid(1, 79).unwrap();
        let t = Telemetry::new("node-a", &gpus);
        t.tick(&mut gpus, true);
        let extra = Extra {
            workers: vec![ReplicaMetrics {
                replica: "r".into(),
                deployment: "ns/d".into(),
                ready: true,
                in_flight: 1,
                completed: 2,
            }],
            cache: vec![CacheTierMetrics { tier: "disk", entries: 1, bytes: 2, capacity: 3 }],
            cache_stats: Some(crate::cache::CacheStats { hashed_fetch_bytes: 42, hits: 3, ..Default::default() }),
        };
        let page = render_with(&t.read(), &extra);
        let on_page: std::collections::BTreeSet<&str> =
            page.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next()).collect();
        let listed: std::collections::BTreeSet<&str> = FAMILIES.iter().copied().collect();
        assert_eq!(on_page, listed);
        assert!(
            page.contains("kiln_agent_cache_hashed_bytes_total{Hostname=\"node-a\",purpose=\"fetch\"} 42"),
            "{page}"
        );
        assert!(page.contains("kiln_agent_cache_events_total{Hostname=\"node-a\",event=\"hit\"} 3"), "{page}");
    }
}
