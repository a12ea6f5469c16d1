//! The run loop: wait for SIGINT or SIGTERM, say which came, then stop the
//! daemon and hand back how its stop went.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// A daemon already serving in the background that can be told to stop.
pub trait Daemon: Send {
    /// Stop serving, wait until the daemon has finished, and return how it
    /// ended.
    fn stop(self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Wait for SIGINT or SIGTERM, log which one arrived, then stop `daemon`
/// and return the result of its stop.
///
/// Both handlers are installed before the first wait, so a signal sent once
/// this future has been polled is never missed.
pub async fn run_until_signal<D: Daemon>(daemon: D) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("interrupted; shutting down"),
        _ = terminate.recv() => tracing::info!("terminated; shutting down"),
    }
    daemon.stop().await
}

#[cfg(test)]
mod tests {
    use std::{
        pin::pin,
        process::Command,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    use super::*;

    struct Fake(Arc<AtomicBool>);

    impl Daemon for Fake {
        async fn stop(self) -> anyhow::Result<()> {
            self.0.store(true, Ordering::SeqCst);
            anyhow::bail!("stop result is passed on")
        }
    }

    #[tokio::test]
    async fn sigterm_stops_the_daemon_and_returns_its_result() {
        let stopped = Arc::new(AtomicBool::new(false));
        let mut run = pin!(run_until_signal(Fake(stopped.clone())));
        // One poll installs the handlers; nothing has arrived yet.
        tokio::select! {
            biased;
            _ = &mut run => panic!("returned before any signal"),
            () = std::future::ready(()) => {}
        }
        assert!(!stopped.load(Ordering::SeqCst));
        let status = Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
        assert!(status.success());
        let result = tokio::time::timeout(Duration::from_secs(10), run).await.expect("no stop after SIGTERM");
        assert!(stopped.load(Ordering::SeqCst));
        assert_eq!(result.unwrap_err().to_string(), "stop result is passed on");
    }
}
