//! The declarative config: its types ([`model`]), how files and request
//! bodies become a [`Config`] ([`load`]), and every check made before a config
//! is accepted ([`validate`]); the JSON Schema of the format ([`schema`]).

pub mod load;
pub mod model;
pub mod pattern;
pub mod refs;
pub mod schema;
pub mod secrets;
pub mod units;
pub mod validate;

use std::fmt;
use std::sync::Arc;

pub use load::{load_paths, name_files, parse_document, Format, LoadedConfig};
pub use model::*;
pub use schema::config_schema;

/// A config that passed validation, and its policies as validation
/// compiled them: the snapshot binds those instead of compiling them again
/// (issue: "parsed once"). A config that did not pass validation on this
/// node (read back from the database, a saved snapshot, a test's literal)
/// comes `From` a [`Config`], and the snapshot compiles its policies.
#[derive(Debug)]
pub struct Validated {
    pub config: Config,
    /// Set by validation only ([`LoadedConfig::validated`]): `None` says
    /// the config was not validated here.
    pub(crate) plan: Option<crate::policy::compile::PolicyPlan>,
}

impl Validated {
    pub fn into_config(self) -> Config {
        self.config
    }
}

impl From<Config> for Validated {
    fn from(config: Config) -> Validated {
        Validated { config, plan: None }
    }
}

impl std::ops::Deref for Validated {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

/// One problem with a config: where it is and what is wrong.
/// Printed as `file: path.to.field: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the entity came from; `None` for a request body.
    pub file: Option<Arc<str>>,
    /// Dotted path to the field, entities named by their `name`
    /// (`routes.users-api.timeout`); empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in a config, never only the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
