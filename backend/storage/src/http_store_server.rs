//! `incfsd serve`: a store directory over HTTP with single-range GET (206), the same contract
//! nginx, S3/GCS static hosting or a CDN give.

use std::net::SocketAddr;
use std::path::Path;

use axum::Router;
use tower_http::services::ServeDir;

use crate::error::{Error, IoContext, Result};

/// The routes of a store: images, blobs and published traces, each a static directory.
pub fn router(store: &Path) -> Router {
    Router::new()
        .nest_service("/images", ServeDir::new(store.join("images")))
        .nest_service("/blobs", ServeDir::new(store.join("blobs")))
        .nest_service("/traces", ServeDir::new(store.join("traces")))
}

/// Serves the store at `store` on `listen` until the process is stopped. `on_bound` gets the
/// bound address (port 0 picks one).
pub async fn run(store: &Path, listen: SocketAddr, on_bound: impl FnOnce(SocketAddr)) -> Result<()> {
    if !store.join("images").is_dir() {
        return Err(Error::NotFound(format!("{} is not a store directory (no images/)", store.display())));
    }
    let listener = tokio::net::TcpListener::bind(listen).await.ctx(|| format!("listen on {listen}"))?;
    let addr = listener.local_addr().ctx(|| "local address".into())?;
    on_bound(addr);
    axum::serve(listener, router(store)).await.ctx(|| "HTTP server".into())
}
