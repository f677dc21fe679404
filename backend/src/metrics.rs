//! Counters in Prometheus text format (`--metrics ADDR`, GET /metrics).

use std::fmt::Write;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::engine::Engine;

pub fn render(engine: &Engine) -> String {
    let mut out = String::new();
    for (name, v) in engine.counters.snapshot() {
        let _ = writeln!(out, "# TYPE incfs_{name}_total counter\nincfs_{name}_total {v}");
    }
    let _ = writeln!(out, "# TYPE incfs_inflight_blocks gauge\nincfs_inflight_blocks {}", engine.inflight_count());
    let _ = writeln!(out, "# TYPE incfs_image_bytes gauge\nincfs_image_bytes {}", engine.image().data_size());
    out
}

pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let e = engine.clone();
            async move { render(&e) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server: {e}");
    }
}
