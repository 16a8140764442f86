//! The event runtime: the work that follows a request rather than serves
//! it — writing the ledger, fanning events out to every `/ws/events` and
//! `/events/stream` subscriber — runs on threads of its own (`[server]
//! event_threads`), optionally at a lower CPU priority than the request
//! path (`event_thread_nice`, 0 by default).
//!
//! With a hundred subscribers, each request becomes two hundred frames to
//! write. On their own threads (measured at nice 10) the gateway's p50
//! overhead at 2,000 req/s fell by a sixth and its CPU per request by 5 %,
//! its p99 unchanged within the VM's noise (BENCHMARKS.md, proxy overhead,
//! 2026-12-02 13:30–15:35 UTC). A lower priority is a weight, and a small
//! one loses: with a core taken by another process, nice 5 let healthy
//! subscribers lag by thousands of frames where nice 0 kept them whole
//! (2026-12-02 17:15–18:45 UTC), so requests now go first by the request
//! threads' shorter slice ([`crate::sched`]) and the events keep an equal
//! share.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;

/// Thread name of the event runtime's workers (in `top -H`, `perf`).
pub const THREAD_NAME: &str = "tollgate-events";

/// The event runtime of one server; dropping it stops its threads.
pub struct EventRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl EventRuntime {
    /// Starts `threads` workers (0: one per four CPUs, at least one), each
    /// `nice` steps below the priority of the thread that starts them.
    pub fn start(threads: usize, nice: u8) -> std::io::Result<EventRuntime> {
        let threads = if threads == 0 {
            auto_threads()
        } else {
            threads
        };
        let warned = std::sync::Arc::new(AtomicBool::new(false));
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(THREAD_NAME)
            .enable_all()
            .on_thread_start(move || {
                if let Err(error) = crate::sched::lower_priority(nice) {
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%error, nice, "cannot lower the event threads' priority; they run at the request path's");
                    }
                }
            })
            .build()?;
        let handle = runtime.handle().clone();
        Ok(EventRuntime {
            runtime: Some(runtime),
            handle,
        })
    }

    /// From `[server]`.
    pub fn from_config(server: &ServerConfig) -> std::io::Result<EventRuntime> {
        EventRuntime::start(server.event_threads as usize, server.event_thread_nice)
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for EventRuntime {
    fn drop(&mut self) {
        // The last reference may go on a tokio thread (even one of this
        // runtime's own), where a blocking shutdown is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The tasks of the event streams: run on the event runtime, and tracked so
/// that shutdown can wait for their close frames.
#[derive(Clone)]
pub struct StreamTasks {
    tracker: TaskTracker,
    runtime: Handle,
}

impl StreamTasks {
    pub fn new(runtime: &EventRuntime) -> StreamTasks {
        StreamTasks {
            tracker: TaskTracker::new(),
            runtime: runtime.handle().clone(),
        }
    }

    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, &self.runtime);
    }

    /// No more tasks; [`StreamTasks::wait`] then completes when the last ends.
    pub fn close(&self) {
        self.tracker.close();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await
    }
}

fn auto_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 4).max(1)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// Runs `f` on a worker of a runtime started with these settings, from
    /// a fresh thread (so the test thread's own priority is left alone).
    fn on_worker<T: Send + 'static>(
        threads: usize,
        nice: u8,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> (i32, T) {
        std::thread::spawn(move || {
            let base = own_nice();
            let runtime = EventRuntime::start(threads, nice).expect("runtime starts");
            let value = futures::executor::block_on(runtime.handle().spawn(async move { f() }))
                .expect("task runs");
            (base, value)
        })
        .join()
        .expect("thread joins")
    }

    #[test]
    fn workers_run_nice_steps_below_the_starting_thread() {
        let (base, worker) = on_worker(1, 5, own_nice);
        assert_eq!(worker, (base + 5).min(19));
        let (base, worker) = on_worker(1, 0, own_nice);
        assert_eq!(worker, base);
    }

    #[test]
    fn priority_is_capped_at_the_lowest() {
        let (base, worker) = on_worker(1, 19, own_nice);
        assert_eq!(worker, (base + 19).min(19));
        assert!(worker > base || base == 19);
    }

    #[test]
    fn workers_are_named_and_counted() {
        let (_, name) = on_worker(2, 0, || std::thread::current().name().map(str::to_owned));
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
        let runtime = EventRuntime::start(3, 0).expect("runtime starts");
        assert_eq!(runtime.handle().metrics().num_workers(), 3);
        let runtime = EventRuntime::start(0, 0).expect("runtime starts");
        assert_eq!(runtime.handle().metrics().num_workers(), auto_threads());
    }

    #[tokio::test]
    async fn dropping_it_inside_a_runtime_does_not_panic() {
        let runtime = EventRuntime::start(1, 0).expect("runtime starts");
        let tasks = StreamTasks::new(&runtime);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        tasks.close();
        tasks.wait().await;
        assert_eq!(rx.await.unwrap().as_deref(), Some(THREAD_NAME));
        drop(runtime);
    }
}
