//! The library's error type. Every input-dependent failure becomes one of these, with a message a
//! user can act on; the CLI adds context with `anyhow` at its edge.

use std::path::PathBuf;

/// Errors raised by the hat library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, out of memory, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file that cannot be read or written. The I/O error is in the message and not also
    /// given as the error's source, so that a report of the chain (`{:#}`) names it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// A model, bundle or data file that exists but cannot be used as it is.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },

    /// A model whose architecture hat does not run.
    #[error("unsupported model architecture '{found}': hat supports {supported}")]
    UnsupportedArchitecture { found: String, supported: &'static str },

    /// Invalid user input (flags, layer ranges, prompts).
    #[error("{0}")]
    InvalidInput(String),

    /// The tokenizer failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A model could not be fetched from the Hugging Face hub or found in its cache.
    #[error("{0}")]
    Hub(String),

    /// A context would grow past what the model or cache allows.
    #[error("context too long: {needed} positions needed, at most {limit} allowed")]
    ContextTooLong { needed: usize, limit: usize },

    /// The cloud refused a session or a block, is busy, cannot be reached, or went away.
    #[error("{message}")]
    Cloud { failure: CloudFailure, message: String },
}

/// How a session with the cloud failed (what a caller can do about it differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudFailure {
    /// The cloud answered with an error for this request (wrong split, token, version, a bad
    /// block): retrying the same request will not help.
    Refused,
    /// The cloud is at its session limit: try again later.
    Busy,
    /// No cloud answered within the connect deadline.
    Unreachable,
    /// The connection went away or a reply was overdue mid-session.
    Lost,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), error: source }
    }

    pub fn bad_file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::BadFile { path: path.into(), reason: reason.to_string() }
    }

    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::InvalidInput(msg.to_string())
    }

    pub fn cloud(failure: CloudFailure, msg: impl std::fmt::Display) -> Self {
        Error::Cloud { failure, message: msg.to_string() }
    }

    /// How the cloud failed, when this is a failure of the cloud or of the link to it.
    pub fn cloud_failure(&self) -> Option<CloudFailure> {
        match self {
            Error::Cloud { failure, .. } => Some(*failure),
            _ => None,
        }
    }
}

/// The name of the first of `fields` that is zero, if any (for "must be positive" checks).
pub fn first_zero<'a>(fields: &[(&'a str, usize)]) -> Option<&'a str> {
    fields.iter().find(|(_, v)| *v == 0).map(|(name, _)| *name)
}

/// Shorthand for `Err(Error::InvalidInput(format!(...)))`.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::InvalidInput(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An I/O error is named once when the CLI reports the chain (`{:#}` walks the sources).
    #[test]
    fn an_io_error_is_reported_once() {
        let e = Error::io("/no/such/file", std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"));
        assert_eq!(e.to_string(), "/no/such/file: no such file");
        assert!(std::error::Error::source(&e).is_none(), "the I/O error is in the message, not a source too");
    }
}
