//! The gateway listener's limits as command-line options, shared by `kiln up` and `kiln controller`
//! ([`kiln_controller::connections::HttpLimits`]).

use std::time::Duration;

use kiln_controller::connections::{HttpLimits, default_max_connections};

/// Limits of the gateway's HTTP listener.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerArgs {
    /// Most gateway connections open at once; more are refused at once (503). Default: the open-file limit less
    /// 256 for everything else, at most 16384 (768 under `ulimit -n 1024`).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A request's headers must arrive within this, e.g. `10s`; slower connections (and idle keep-alive ones) are
    /// closed.
    #[arg(long, default_value = "10s", value_parser = crate::up::seconds)]
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this once its headers have, e.g. `30s` (408 after it).
    #[arg(long, default_value = "30s", value_parser = crate::up::seconds)]
    pub body_read_timeout: Duration,
}

impl ListenerArgs {
    /// The limits these options give.
    pub fn limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections.unwrap_or_else(default_max_connections).max(1),
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            ..HttpLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        listener: ListenerArgs,
    }

    #[test]
    fn options_become_the_listener_limits() {
        let defaults = Command::parse_from(["kiln"]).listener.limits();
        assert_eq!(defaults, HttpLimits::default());
        let set = Command::parse_from([
            "kiln",
            "--max-connections",
            "5",
            "--header-read-timeout",
            "2s",
            "--body-read-timeout",
            "1m",
        ])
        .listener
        .limits();
        assert_eq!(set.max_connections, 5);
        assert_eq!(set.header_read_timeout, Duration::from_secs(2));
        assert_eq!(set.body_read_timeout, Duration::from_secs(60));
        assert_eq!(set.max_body_bytes, HttpLimits::default().max_body_bytes);
    }
}
