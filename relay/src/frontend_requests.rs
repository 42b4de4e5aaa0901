//! Requests from the relay to the device VM's VMM (the vhost-user frontend) on the
//! backend channel: BACKEND_SHMEM_MAP and BACKEND_SHMEM_UNMAP, each acknowledged.
//!
//! The vhost crate's `Backend` waits for the acknowledgement with a blocking read and no
//! timeout, and the relay sends these requests while it handles a client's DMA_MAP or
//! DMA_UNMAP. A frontend that never answers would stall that thread, and with it every
//! client. So the requests run on a thread of their own and the caller waits at most a
//! deadline: past it, the channel is given up (the thread stays blocked until the
//! frontend closes its socket, then ends).

use std::sync::mpsc;
use std::time::Duration;

use vhost::vhost_user::Backend;

type Job = Box<dyn FnOnce(&Backend) + Send>;

/// The backend channel of one frontend connection.
pub struct FrontendRequests {
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
}

impl FrontendRequests {
    /// Serves `backend` from a new thread; each request may take `timeout`.
    pub fn start(backend: Backend, timeout: Duration) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vfu-frontend-req".into())
            .spawn(move || {
                for job in rx {
                    job(&backend);
                }
            })?;
        Ok(Self { jobs, timeout })
    }

    /// Runs `request` against the backend channel and returns its result, or `None` if
    /// the frontend did not answer in time (or the channel's thread is gone).
    pub fn call<R: Send + 'static>(
        &self,
        request: impl FnOnce(&Backend) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |b| {
                let _ = tx.send(request(b));
            }))
            .ok()?;
        rx.recv_timeout(self.timeout).ok()
    }
}
