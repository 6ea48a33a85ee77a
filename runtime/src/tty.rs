//! `fd run -t`: the container's pseudo-terminal.
//!
//! libcontainer makes the pty inside the container and sends its master end over a unix
//! socket (the "console socket") as an `SCM_RIGHTS` message. The helper listens on that
//! socket, receives the master, copies its own stdin to the master and the master to its own
//! stdout, and keeps the pty's window size equal to the caller's terminal (at start and on
//! every SIGWINCH). `fd run` puts the caller's terminal in raw mode for the life of the run,
//! so keys such as Ctrl-C reach the container's line discipline instead of ending `fd run`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{Result, RuntimeError, io_err};

/// File name of the console socket inside the bundle directory.
pub const CONSOLE_SOCKET: &str = "console.sock";

/// How long the helper waits for libcontainer to send the pty master after the container
/// was created (it is sent before creation completes, so this is only a safety net).
const MASTER_WAIT: Duration = Duration::from_secs(10);

/// Binds the console socket in `dir`. A unix socket path is limited to 107 bytes and a
/// store's run directory can be deeper than that, so the socket is bound by a name relative
/// to `dir` (the helper is single-threaded, so changing the working directory for a moment
/// affects nothing else).
pub fn bind_console_socket(dir: &Path) -> Result<(UnixListener, PathBuf)> {
    let previous = std::env::current_dir().map_err(io_err("reading the working directory"))?;
    std::env::set_current_dir(dir).map_err(io_err(format!("entering {}", dir.display())))?;
    let bound = UnixListener::bind(CONSOLE_SOCKET);
    std::env::set_current_dir(&previous)
        .map_err(io_err(format!("returning to {}", previous.display())))?;
    let listener = bound.map_err(io_err("binding the console socket"))?;
    Ok((listener, dir.join(CONSOLE_SOCKET)))
}

/// Accepts libcontainer's connection and receives the pty master it sends.
pub fn receive_master(listener: &UnixListener) -> Result<OwnedFd> {
    listener
        .set_nonblocking(true)
        .map_err(io_err("setting the console socket non-blocking"))?;
    let deadline = Instant::now() + MASTER_WAIT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("accepting the container's console connection")(e)),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(io_err("setting the console connection blocking"))?;
    stream
        .set_read_timeout(Some(MASTER_WAIT))
        .map_err(io_err("setting a timeout on the console connection"))?;
    receive_fd(stream.as_raw_fd())
}

/// Receives one descriptor passed with `SCM_RIGHTS` on the connected socket `sock`.
fn receive_fd(sock: RawFd) -> Result<OwnedFd> {
    let mut data = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one control message carrying a few descriptors, aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set below refers to buffers that live until
    // recvmsg returns.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes valid, writable buffers; MSG_CMSG_CLOEXEC only sets a flag on
    // the descriptors received.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io_err("receiving the pty master")(
            std::io::Error::last_os_error(),
        ));
    }
    let mut received: Vec<OwnedFd> = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors now owned here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let fds = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(fds.add(i));
                    received.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // Anything beyond the first descriptor is closed when `received` drops.
    if received.is_empty() {
        return Err(RuntimeError::Invalid(
            "the container's console connection carried no descriptor".into(),
        ));
    }
    Ok(received.swap_remove(0))
}

/// True when `fd` is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size of the first of `fds` that is a terminal.
pub fn window_size(fds: &[RawFd]) -> Option<libc::winsize> {
    fds.iter().find_map(|&fd| {
        // SAFETY: TIOCGWINSZ writes only into `ws`.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(ws)
    })
}

/// Copies the caller's window size (from its stdin, stdout or stderr, whichever is a
/// terminal) onto the pty `master`.
pub fn copy_window_size(master: RawFd) {
    if let Some(ws) = window_size(&[0, 1, 2]) {
        // SAFETY: TIOCSWINSZ reads `ws`, which is valid for the call.
        let rc = unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "setting the window size");
        }
    }
}

/// The copies between the caller's stdio and the pty master.
pub struct Relay {
    output_done: mpsc::Receiver<()>,
}

impl Relay {
    /// Starts copying stdin to `master` and `master` to stdout, each on a thread of its own.
    /// Call only after libcontainer has forked (see [`crate::container`]).
    pub fn start(master: &OwnedFd) -> Result<Relay> {
        let dup = |what: &str| {
            master
                .try_clone()
                .map(File::from)
                .map_err(io_err(format!("duplicating the pty master for {what}")))
        };
        let mut to_container = dup("input")?;
        let mut from_container = dup("output")?;
        let stdin = dup_std(0)?;
        let stdout = dup_std(1)?;
        std::thread::Builder::new()
            .name("fd-tty-in".into())
            .spawn(move || {
                let mut stdin = stdin;
                // Ends at the end of stdin (always at once without -i, where stdin is
                // /dev/null); the master stays open for the output side.
                let _ = copy(&mut stdin, &mut to_container);
            })
            .map_err(io_err("starting the pty input thread"))?;
        let (done, output_done) = mpsc::channel();
        std::thread::Builder::new()
            .name("fd-tty-out".into())
            .spawn(move || {
                let mut stdout = stdout;
                // Reading the master fails with EIO once every slave descriptor is closed,
                // that is when the container's processes are gone.
                let _ = copy(&mut from_container, &mut stdout);
                let _ = done.send(());
            })
            .map_err(io_err("starting the pty output thread"))?;
        Ok(Relay { output_done })
    }

    /// Waits up to `limit` for the container's last output to be written. A process that
    /// left the container's pty open in the background would keep the output side going
    /// forever, hence the limit.
    pub fn finish(self, limit: Duration) {
        let _ = self.output_done.recv_timeout(limit);
    }
}

fn dup_std(fd: RawFd) -> Result<File> {
    // SAFETY: 0, 1 and 2 are open for the life of the helper (its parent sets them up).
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed
        .try_clone_to_owned()
        .map(File::from)
        .map_err(io_err(format!("duplicating descriptor {fd}")))
}

/// Copies until end of input or an error, flushing each read at once (a terminal shows
/// output as it comes).
fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// The caller's terminal in raw mode; the previous settings come back on drop.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal on `fd` in raw mode; None when `fd` is not a terminal.
    pub fn enable(fd: RawFd) -> std::io::Result<Option<RawMode>> {
        if !is_terminal(fd) {
            return Ok(None);
        }
        // SAFETY: tcgetattr writes only into `saved`.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads `raw`, valid for the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads `saved`, valid for the call; a failure leaves nothing to do.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pty pair made here: (master, slave).
    fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes the two descriptors; name, termios and size are optional.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened and are owned by nobody else.
        Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
    }

    #[test]
    fn a_descriptor_sent_over_the_console_socket_is_received() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err("tempdir"))?;
        let (listener, path) = bind_console_socket(dir.path())?;
        let (master, _slave) = openpty().map_err(io_err("openpty"))?;
        let client = std::os::unix::net::UnixStream::connect(&path).map_err(io_err("connect"))?;
        // Send the master the way libcontainer does: one byte of data, one SCM_RIGHTS fd.
        let mut byte = *b"x";
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 4];
        // SAFETY: the header and buffers are valid for the calls; the control buffer is big
        // enough for one descriptor.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), master.as_raw_fd());
            assert_eq!(libc::sendmsg(client.as_raw_fd(), &msg, 0), 1);
        }
        let got = receive_master(&listener)?;
        assert!(is_terminal(got.as_raw_fd()));
        Ok(())
    }

    #[test]
    fn raw_mode_is_restored_on_drop() -> Result<()> {
        let (_master, slave) = openpty().map_err(io_err("openpty"))?;
        let fd = slave.as_raw_fd();
        let lflag = || {
            // SAFETY: tcgetattr writes only into `t`.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
            t.c_lflag
        };
        let before = lflag();
        assert!(before & libc::ICANON != 0);
        {
            let raw = RawMode::enable(fd).map_err(io_err("raw mode"))?;
            assert!(raw.is_some());
            assert_eq!(lflag() & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        }
        assert_eq!(lflag(), before);
        let null = File::open("/dev/null").map_err(io_err("/dev/null"))?;
        assert!(
            RawMode::enable(null.as_raw_fd())
                .map_err(io_err("raw mode"))?
                .is_none()
        );
        Ok(())
    }
}
