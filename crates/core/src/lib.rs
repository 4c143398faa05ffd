//! # trellis-core
//!
//! The few types every Trellis crate and every config file shares, kept tiny on purpose
//! (no I/O, no runtime):
//!
//! - [`HumanDuration`]: durations written the way the seed writes them — a number is
//!   milliseconds, a string is `"500ms"`, `"10s"`, `"1m"` or `"1h"`;
//! - [`validate_name`]: the rule for service names, instance ids and environments.
//!
//! ```
//! use trellis_core::{HumanDuration, parse_duration};
//! assert_eq!(parse_duration("1m").unwrap().as_secs(), 60);
//! let d: HumanDuration = serde_json::from_str("30000").unwrap();
//! assert_eq!(d.to_string(), "30s");
//! ```

mod duration;
mod name;

pub use duration::{DurationError, HumanDuration, format_duration, parse_duration};
pub use name::{NameError, NameKind, validate_name};
