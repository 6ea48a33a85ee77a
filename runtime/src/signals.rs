//! Signals taken synchronously: blocked in every thread, then received with `sigtimedwait`.
//! Both `fd run` and its helper wait for "a child changed state or a signal came" this way,
//! without handlers that would run at arbitrary points.

use std::time::Duration;

/// Signals forwarded to the container.
pub const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn set_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set they are given, which lives on this
    // stack frame and is initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// The forwarded signals and SIGCHLD.
pub fn waited() -> Vec<i32> {
    let mut v = FORWARDED.to_vec();
    v.push(libc::SIGCHLD);
    v
}

/// Blocks `signals` in the calling thread (and the threads it starts later). A process that
/// `exec`s keeps its mask, which is why the helper blocks only after the container exists:
/// std's `Command` clears the mask of the processes it spawns, libcontainer does not.
pub fn block(signals: &[i32]) -> std::io::Result<()> {
    let set = set_of(signals);
    // SAFETY: `set` is a valid signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits up to `timeout` for one of `signals` (which must be blocked); returns it.
pub fn wait(signals: &[i32], timeout: Duration) -> Option<i32> {
    let set = set_of(signals);
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Sends `sig` to `pid`; errors (the process is gone) are ignored.
pub fn send(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The exit status a shell would report for a wait status: the exit code, or 128 + signal.
pub fn exit_code_of(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        125
    }
}

/// Unblocks every signal in the calling thread.
pub fn unblock_all() -> std::io::Result<()> {
    let set = set_of(&[]);
    // SAFETY: `set` is a valid (empty) signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The last stop signal that came while [`record_early`]'s handler was in place.
static EARLY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn remember(sig: libc::c_int) {
    EARLY.store(sig, std::sync::atomic::Ordering::Relaxed);
}

/// Makes `signals` set a flag instead of ending the process, until they are blocked and
/// waited for. The helper does this while libcontainer creates the container: dying there
/// (to the SIGTERM sent when `fd run` is killed) would leave the container's first process
/// waiting forever for a start that never comes. A handler, unlike an ignored signal, is
/// reset by exec, so the container does not inherit it.
pub fn record_early(signals: &[i32]) -> std::io::Result<()> {
    for &sig in signals {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised before the call.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = remember as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal recorded by [`record_early`]'s handler, if one came; clears it.
pub fn take_early() -> Option<i32> {
    let sig = EARLY.swap(0, std::sync::atomic::Ordering::Relaxed);
    (sig > 0).then_some(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_early_signal_is_recorded_not_fatal() -> std::io::Result<()> {
        record_early(&[libc::SIGUSR2])?;
        // SAFETY: raise sends a signal to this thread, whose handler was just installed.
        unsafe { libc::raise(libc::SIGUSR2) };
        assert_eq!(take_early(), Some(libc::SIGUSR2));
        assert_eq!(take_early(), None);
        Ok(())
    }
}
