//! The command line's errors: a flag that cannot work (named by the flag), or the job's own
//! error (named by file, tensor or setting), with a hint in flags where one helps.

use loftq_models::ModelError;

/// What a command fails with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag's value, or a combination of flags, that cannot work; the message names them.
    #[error("{0}")]
    Flag(String),
    /// The library's error.
    #[error(transparent)]
    Job(#[from] ModelError),
    /// The GPU failed during the run; its innermost cause (`crate::failure`).
    #[error("the device failed: {0}")]
    Device(String),
}

/// Results of the commands.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// A [`CliError::Flag`].
pub fn invalid(msg: impl Into<String>) -> CliError {
    CliError::Flag(msg.into())
}

impl CliError {
    /// The flags that usually fix this error, for a line after it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::Job(ModelError::Output { .. }) => {
                Some("choose another --out, or pass --resume if the command takes it")
            }
            CliError::Job(ModelError::Interrupted { .. }) => {
                Some("make room, then run the same command again with --resume")
            }
            CliError::Job(ModelError::Distillation { .. }) => Some(
                "run the same command again with --resume, with other --distill-* values or \
                 without --distill-steps",
            ),
            CliError::Job(ModelError::Diverged { .. }) => {
                Some("lower --lr, or clip with --max-grad-norm")
            }
            CliError::Device(_) => Some(
                "the work may not fit the device's memory or its largest buffer: less at once \
                 (--batch, --seq, --tokens, --device-batch, as the command takes them), or \
                 --device cpu",
            ),
            _ => None,
        }
    }
}
