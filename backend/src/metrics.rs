//! Counters in Prometheus (OpenMetrics) text format (`--metrics ADDR`, GET /metrics).
//!
//! The values live in the engine's and the devices' atomics; a [`Snapshot`] source is read
//! at each scrape and encoded by `prometheus-client` under the `incfs_` prefix, so a counter
//! `reads` is exported as `incfs_reads_total` and a gauge `image_bytes` as `incfs_image_bytes`.

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::engine::Engine;

/// Prefix of every exported name.
const PREFIX: &str = "incfs";

const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Values read at each scrape.
pub trait Snapshot: Send + Sync + 'static {
    /// Monotonic counters, by name without prefix or `_total`.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Current levels, by name without prefix.
    fn gauges(&self) -> Vec<(&'static str, u64)>;
    /// Gauges in seconds (or any fraction), by name without prefix.
    fn fractional_gauges(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// Encodes a [`Snapshot`] as const metrics each time the registry is encoded.
struct SnapshotCollector<S>(S);

// prometheus-client wants collectors to be Debug; the engine and the disk are not.
impl<S> std::fmt::Debug for SnapshotCollector<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

impl<S: Snapshot> Collector for SnapshotCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, value) in self.0.counters() {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, name, None, counter.metric_type())?)?;
        }
        for (name, value) in self.0.gauges() {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, name, None, gauge.metric_type())?)?;
        }
        for (name, value) in self.0.fractional_gauges() {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, name, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The metrics of one daemon: the engine's, then its device's.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics { registry: Registry::with_prefix(PREFIX) }
    }

    pub fn register(&mut self, source: impl Snapshot) {
        self.registry.register_collector(Box::new(SnapshotCollector(source)));
    }

    /// The exposition text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String fails only if a metric's encoding does, which const
        // counters and gauges do not.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The engine's counters, blocks being fetched, the image's size and the start-up: what
/// opening the image fetched (`incfs_startup_bytes`, `incfs_startup_requests`) and the
/// seconds from the daemon's start until it served (`incfs_ready_seconds`) and until it
/// answered its first read (`incfs_first_read_seconds`, absent until then).
pub struct EngineSnapshot(pub Arc<Engine>);

impl Snapshot for EngineSnapshot {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.0.counters.snapshot()
    }

    fn gauges(&self) -> Vec<(&'static str, u64)> {
        let s = &self.0.startup;
        let (index_bytes, index_segments) = self.0.loaded_index_usage();
        vec![
            ("inflight_blocks", self.0.inflight_count() as u64),
            ("loaded_index_bytes", index_bytes as u64),
            ("loaded_index_segments", index_segments as u64),
            ("image_bytes", self.0.image().data_size()),
            ("startup_bytes", s.fetched_bytes),
            ("startup_requests", s.fetched_requests),
        ]
    }

    fn fractional_gauges(&self) -> Vec<(&'static str, f64)> {
        self.0.startup.seconds()
    }
}

/// Per-source counters of a store with mirrors (`incfs_source_mirror0_requests_total`...,
/// `incfs_source_origin_failures_total`).
pub struct SourceSnapshot {
    engine: Arc<Engine>,
    /// The names, made once: the set of sources is fixed when the store is opened.
    names: Vec<&'static str>,
}

impl SourceSnapshot {
    /// None without mirrors.
    pub fn new(engine: Arc<Engine>) -> Option<Self> {
        let counters = engine.remote().source_counters();
        if counters.is_empty() {
            return None;
        }
        // Leaked once per daemon: a handful of names for its lifetime.
        let names = counters.into_iter().map(|(n, _)| &*Box::leak(n.into_boxed_str())).collect();
        Some(SourceSnapshot { engine, names })
    }
}

impl Snapshot for SourceSnapshot {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.names.iter().copied().zip(self.engine.remote().source_counters().into_iter().map(|(_, v)| v)).collect()
    }

    fn gauges(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Answers GET /metrics on `listener` until the runtime stops.
pub async fn run_http_endpoint(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([(CONTENT_TYPE, OPENMETRICS_TEXT)], m.encode()) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics endpoint: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Snapshot for Fixed {
        fn counters(&self) -> Vec<(&'static str, u64)> {
            vec![("reads", 7), ("bytes_fetched", 4096)]
        }

        fn gauges(&self) -> Vec<(&'static str, u64)> {
            vec![("image_bytes", 1 << 20)]
        }

        fn fractional_gauges(&self) -> Vec<(&'static str, f64)> {
            vec![("first_read_seconds", 0.25)]
        }
    }

    /// The names and values scrapers (tests, dashboards) read: `incfs_<counter>_total` and
    /// `incfs_<gauge>`, one `NAME VALUE` line each.
    #[test]
    fn names_and_values() {
        let mut m = Metrics::new();
        m.register(Fixed);
        let text = m.encode();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "incfs_reads_total 7",
                "incfs_bytes_fetched_total 4096",
                "incfs_image_bytes 1048576",
                "incfs_first_read_seconds 0.25"
            ]
        );
        assert!(text.contains("# TYPE incfs_reads counter\n"), "{text}");
        assert!(text.contains("# TYPE incfs_image_bytes gauge\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
