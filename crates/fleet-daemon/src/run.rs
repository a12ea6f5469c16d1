//! The run loop: wait for SIGINT or SIGTERM, say which came, then stop the
//! daemon and hand back how its stop went.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// A daemon already serving in the background that can be told to stop.
pub trait Daemon: Send {
    /// Stop serving, wait until the daemon has finished, and return how it
    /// ended.
    fn stop(self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Resolves if the daemon stops serving without being told to (its
    /// server failed), with why. Never resolves while all is well.
    fn ended(&mut self) -> impl Future<Output = anyhow::Error> + Send + '_;
}

/// A server task running in the background, and the means to stop it:
/// what each daemon's `Running` holds.
#[derive(Debug)]
pub struct Serving {
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Serving {
    /// Spawn the server `serve` builds; it is handed a future that resolves
    /// when the server should stop (for tonic's
    /// `serve_with_incoming_shutdown`).
    pub fn spawn<F, Fut>(serve: F) -> Serving
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (shutdown, mut rx) = tokio::sync::watch::channel(false);
        let stop = Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        Serving { shutdown, task: tokio::spawn(serve(stop)) }
    }

    /// Wait until the server fails or is stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.map_err(|e| anyhow::anyhow!("the server task panicked: {e}"))?
    }
}

impl Daemon for Serving {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Any end of the task is a failure: it is told to stop only by `stop`.
    async fn ended(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Ok(())) => anyhow::anyhow!("the server stopped serving without being told to"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("the server task panicked: {e}"),
        }
    }
}

/// Wait for SIGINT or SIGTERM, log which one arrived, then stop `daemon`
/// and return the result of its stop. If the daemon stops serving on its
/// own first, return that as an error, so the process exits non-zero and a
/// supervisor (systemd's `Restart=on-failure`) starts it again.
///
/// Both handlers are installed before the first wait, so a signal sent once
/// this future has been polled is never missed.
pub async fn run_until_signal<D: Daemon>(mut daemon: D) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("interrupted; shutting down"),
        _ = terminate.recv() => tracing::info!("terminated; shutting down"),
        e = daemon.ended() => {
            tracing::error!(error = %format!("{e:#}"), "stopped serving; exiting");
            return Err(e);
        }
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

        async fn ended(&mut self) -> anyhow::Error {
            std::future::pending().await
        }
    }

    /// A daemon whose server fails after a moment.
    struct Failing;

    impl Daemon for Failing {
        async fn stop(self) -> anyhow::Result<()> {
            panic!("a daemon that ended is not stopped")
        }

        async fn ended(&mut self) -> anyhow::Error {
            tokio::time::sleep(Duration::from_millis(50)).await;
            anyhow::anyhow!("gRPC server failed: listener closed")
        }
    }

    #[tokio::test]
    async fn a_daemon_that_stops_serving_on_its_own_ends_the_run_with_its_error() {
        let result = tokio::time::timeout(Duration::from_secs(10), run_until_signal(Failing)).await.expect("no end");
        assert_eq!(result.unwrap_err().to_string(), "gRPC server failed: listener closed");
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
