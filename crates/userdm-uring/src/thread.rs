//! Placement of data-path threads.

use std::io;

/// Moves the calling thread to `SCHED_BATCH`: it keeps its nice level and its share of the CPU,
/// but its wakeups no longer preempt the task running on its CPU.
///
/// Why data-path threads want this: their work comes from a process on the same machine (a
/// ublk queue's submitters, a local NBD client) that often shares the CPU. Under the default
/// policy each new request wakes the server thread, which preempts the submitter in the middle
/// of queueing its batch; the two then take turns request by request. Without wakeup
/// preemption the submitter queues its batch and blocks, and the server serves the batch in one
/// turn. A lone request loses nothing: its submitter blocks at once, leaving the CPU free.
pub fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid, live parameter.
    let res = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of thread `tid` of this process (field 41 of its stat).
    fn policy(tid: libc::pid_t) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The fields after the command name, which is in parentheses, start at field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }

    #[test]
    fn batch_scheduling_applies_to_the_calling_thread_only() {
        // SAFETY: gettid takes no arguments and cannot fail.
        let main_tid = unsafe { libc::gettid() };
        let batch = std::thread::spawn(|| {
            set_batch_scheduling().unwrap();
            // SAFETY: as above.
            policy(unsafe { libc::gettid() })
        })
        .join()
        .unwrap();
        assert_eq!(batch, libc::SCHED_BATCH);
        assert_eq!(policy(main_tid), libc::SCHED_OTHER);
    }
}
