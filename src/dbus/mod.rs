//! The `org.modvisor1` D-Bus face (thin: methods forward to the supervisor handle) and the
//! client proxies `modvisorctl` and the tests use.

mod authz;
pub mod client;
pub mod embedded;
mod error;
pub mod models;
pub mod props;
mod publisher;
pub mod ratelimit;
pub mod server;
pub mod text;
mod throttle;

pub const BUS_NAME: &str = "org.modvisor1";
pub const MANAGER_PATH: &str = "/org/modvisor1";
pub const MANAGER_IFACE: &str = "org.modvisor1.Manager";
pub const MODULE_IFACE: &str = "org.modvisor1.Module";
/// The group whose members may change things (besides root).
pub const ADMIN_GROUP: &str = "modvisor";

pub use crate::objpath::escape_path_element;

pub fn module_path(name: &str) -> String {
    format!("{MANAGER_PATH}/module/{}", escape_path_element(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape_path_element("llama-chat"), "llama_2dchat");
        assert_eq!(escape_path_element("a_b"), "a_5fb");
        assert_eq!(escape_path_element("0x"), "_30x");
        assert_eq!(module_path("web"), "/org/modvisor1/module/web");
    }
}
