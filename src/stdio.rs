//! The process's stdin and stdout, for the stdio transport.
//!
//! MCP clients start a server with pipes (or a socket pair) for its stdin
//! and stdout. Those are read and written here without blocking, on the
//! runtime's own event loop. tokio's `stdin()` and `stdout()` would hand
//! every read and every write to a thread of the blocking pool and back:
//! on a paid call's path those hand-offs cost more than its ledger writes.
//! Anything else (a terminal, a file) gets tokio's.

use tokio::io::{AsyncRead, AsyncWrite};

pub type Input = Box<dyn AsyncRead + Unpin + Send>;
pub type Output = Box<dyn AsyncWrite + Unpin + Send>;

/// Stdin. Must be called inside the runtime.
pub fn stdin() -> Input {
    evented_or(evented::stdin(), "stdin", || Box::new(tokio::io::stdin()))
}

/// Stdout. Must be called inside the runtime.
pub fn stdout() -> Output {
    evented_or(
        evented::stdout(),
        "stdout",
        || Box::new(tokio::io::stdout()),
    )
}

/// The evented stream if there is one, else tokio's blocking one.
fn evented_or<T>(
    evented: std::io::Result<Option<T>>,
    name: &str,
    blocking: impl FnOnce() -> T,
) -> T {
    match evented {
        Ok(Some(stream)) => stream,
        Ok(None) => blocking(),
        Err(e) => {
            tracing::debug!("{name} goes through tokio's blocking pool: {e}");
            blocking()
        }
    }
}

#[cfg(unix)]
mod evented {
    use std::{
        fs::File,
        io,
        os::{
            fd::{AsFd, BorrowedFd, OwnedFd},
            unix::{fs::FileTypeExt, net::UnixStream},
        },
    };

    use tokio::net::unix::pipe;

    use super::{Input, Output};

    /// A pipe or a socket is set non-blocking (a copy of the descriptor,
    /// which shares that flag with the original) and registered with the
    /// runtime; `None` for anything else.
    fn open<T>(
        fd: BorrowedFd<'_>,
        as_pipe: impl FnOnce(File) -> io::Result<T>,
        as_socket: impl FnOnce(tokio::net::UnixStream) -> T,
    ) -> io::Result<Option<T>> {
        let file = File::from(fd.try_clone_to_owned()?);
        let kind = file.metadata()?.file_type();
        if kind.is_fifo() {
            return as_pipe(file).map(Some);
        }
        if kind.is_socket() {
            let socket = UnixStream::from(OwnedFd::from(file));
            socket.set_nonblocking(true)?;
            return Ok(Some(as_socket(tokio::net::UnixStream::from_std(socket)?)));
        }
        Ok(None)
    }

    pub(super) fn stdin() -> io::Result<Option<Input>> {
        open(
            io::stdin().as_fd(),
            |file| Ok(Box::new(pipe::Receiver::from_file(file)?) as Input),
            |socket| Box::new(socket) as Input,
        )
    }

    pub(super) fn stdout() -> io::Result<Option<Output>> {
        open(
            io::stdout().as_fd(),
            |file| Ok(Box::new(pipe::Sender::from_file(file)?) as Output),
            |socket| Box::new(socket) as Output,
        )
    }
}

#[cfg(not(unix))]
mod evented {
    use super::{Input, Output};

    pub(super) fn stdin() -> std::io::Result<Option<Input>> {
        Ok(None)
    }

    pub(super) fn stdout() -> std::io::Result<Option<Output>> {
        Ok(None)
    }
}
