//! The errors modvisord answers D-Bus calls with (`org.modvisor1.Error.*`): the supervisor's
//! refusals, their texts cleaned for the bus and bounded.

use super::text::clean;
use crate::supervisor::OpError;

#[derive(zbus::DBusError, Debug)]
#[zbus(prefix = "org.modvisor1.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchModule(String),
    NotAllowed(String),
    InvalidArgument(String),
    Busy(String),
    Failed(String),
}

/// Error texts are cleaned for the bus and bounded: an engine's error line in a failed
/// activation, or a manifest's values, never grow a reply past a few KiB.
fn bounded(s: &str) -> String {
    clean(&crate::bounded::cap_for_dbus(s))
}

impl From<OpError> for Error {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NoSuchModule(s) => Error::NoSuchModule(bounded(&s)),
            OpError::InvalidArgument(s) => Error::InvalidArgument(bounded(&s)),
            OpError::NotAllowed(s) => Error::NotAllowed(bounded(&s)),
            OpError::Busy(s) => Error::Busy(bounded(&s)),
            OpError::Failed(s) => Error::Failed(bounded(&s)),
        }
    }
}
