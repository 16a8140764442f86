//! How the gateway's threads ask the kernel to schedule them: the event
//! threads a lower priority (`[server] event_thread_nice`), the request
//! threads a shorter time slice (`[server] request_thread_slice_us`).
//!
//! Both are Linux settings of the calling thread; elsewhere they do nothing.
//! Neither needs privileges: a thread may lower its own priority and choose
//! its own slice.

/// Thread name of the request runtime's workers (in `top -H`, `perf`).
pub const REQUEST_THREAD_NAME: &str = "tollgate-request";

/// The slice a thread may ask for, in microseconds (the kernel clamps to
/// this range; outside it a setting would not mean what it says).
pub const SLICE_RANGE_US: std::ops::RangeInclusive<u32> = 100..=100_000;

/// Lowers the calling thread's priority by `nice` steps (capped at 19, the
/// lowest). Raising it back would need privileges; nothing here does.
#[cfg(target_os = "linux")]
pub fn lower_priority(nice: u8) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    let target = (own_nice()? + i32::from(nice)).min(19);
    // On Linux the nice value is per thread, and PRIO_PROCESS with who = 0
    // names the calling thread (setpriority(2), BUGS).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Elsewhere the nice value may be per process (it would slow the request
/// path too), so the event threads keep the process's priority.
#[cfg(not(target_os = "linux"))]
pub fn lower_priority(_nice: u8) -> std::io::Result<()> {
    Ok(())
}

/// Asks for a time slice of `us` microseconds for the calling thread (0:
/// the kernel's default), keeping its policy and nice value.
///
/// Linux's EEVDF scheduler (6.12 and later) lets a thread choose its slice
/// between 0.1 and 100 ms. A thread with a short slice that wakes up may
/// preempt one that is inside a longer slice instead of waiting it out (up
/// to 1.4 ms by default on two CPUs): a request whose upstream answered is
/// relayed at once even when every CPU is busy with other work. Older
/// kernels ignore the setting. Threads the calling thread starts inherit
/// the slice (sqlx's SQLite worker for a connection a request opened, say;
/// even with `SCHED_FLAG_RESET_ON_FORK`, tested on 6.18).
#[cfg(target_os = "linux")]
pub fn set_slice(us: u32) -> std::io::Result<()> {
    /// `struct sched_attr` of sched_setattr(2), its first version.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    /// sched_setattr(2): keep the thread's policy (fair, batch…).
    const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: 0,
        flags: SCHED_FLAG_KEEP_POLICY,
        // The nice value is set from the attribute as well: pass the
        // thread's own so that only the slice changes.
        nice: own_nice()?,
        priority: 0,
        runtime: u64::from(us) * 1_000,
        deadline: 0,
        period: 0,
    };
    // pid 0: the calling thread. The C library has no wrapper.
    let done = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn set_slice(_us: u32) -> std::io::Result<()> {
    Ok(())
}

/// Whether this kernel honours a chosen slice (Linux 6.12 and later);
/// older ones accept [`set_slice`] and keep their own.
pub fn slices_are_honoured() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let major = numbers.next().unwrap_or(0);
    let minor = numbers.next().unwrap_or(0);
    (major, minor) >= (6, 12)
}

/// The calling thread's nice value.
#[cfg(target_os = "linux")]
fn own_nice() -> std::io::Result<i32> {
    // getpriority may rightly return -1, so errno tells its errors apart.
    unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if current == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(current)
    }
}

/// Builds the runtime that serves requests: `tollgate-request` workers,
/// each asking for a slice of `slice_us` (0: the kernel's default). A
/// refused setting is logged once and the runtime runs without it.
pub fn request_runtime(slice_us: u32) -> std::io::Result<tokio::runtime::Runtime> {
    let warned = std::sync::atomic::AtomicBool::new(false);
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(REQUEST_THREAD_NAME)
        .enable_all()
        .on_thread_start(move || {
            if slice_us == 0 {
                return;
            }
            if let Err(error) = set_slice(slice_us) {
                if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(%error, slice_us, "cannot set the request threads' time slice; they keep the kernel's");
                }
            }
        })
        .build()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's slice in nanoseconds, as the kernel reports it
    /// (`se.slice` in /proc/thread-self/sched), where it does.
    fn own_slice_ns() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    /// The slice a thread that asked for `us` should report.
    fn expected_slice(us: u32, default: u64) -> u64 {
        if slices_are_honoured() {
            u64::from(us) * 1_000
        } else {
            default
        }
    }

    /// Runs `f` on a fresh thread, so the test thread's settings are kept.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread joins")
    }

    #[test]
    fn a_slice_is_set_on_the_calling_thread_only_and_keeps_its_nice() {
        let Some(default) = own_slice_ns() else {
            eprintln!("skipped: this kernel does not report se.slice (before 6.6)");
            return;
        };
        let (nice_before, nice_after, slice, child) = on_thread(|| {
            lower_priority(3).unwrap();
            let before = own_nice().unwrap();
            set_slice(250).unwrap();
            let child = on_thread(|| (own_nice().unwrap(), own_slice_ns()));
            (before, own_nice().unwrap(), own_slice_ns(), child)
        });
        assert_eq!(nice_after, nice_before, "the slice leaves nice alone");
        assert_eq!(slice, Some(expected_slice(250, default)));
        assert_eq!(
            child,
            (nice_before, slice),
            "a thread it starts inherits both (clone(2) copies them)"
        );
        assert_eq!(own_slice_ns(), Some(default), "other threads keep theirs");
        let back = on_thread(|| {
            set_slice(250).unwrap();
            set_slice(0).unwrap();
            own_slice_ns()
        });
        assert_eq!(back, Some(default), "0 returns to the kernel's default");
    }

    #[test]
    fn request_workers_are_named_and_ask_for_the_slice() {
        let runtime = request_runtime(300).expect("runtime starts");
        let (name, slice) = runtime.block_on(async {
            tokio::spawn(async {
                (
                    std::thread::current().name().map(str::to_owned),
                    own_slice_ns(),
                )
            })
            .await
            .unwrap()
        });
        assert_eq!(name.as_deref(), Some(REQUEST_THREAD_NAME));
        if let Some(default) = own_slice_ns() {
            assert_eq!(slice, Some(expected_slice(300, default)));
        }
    }
}
