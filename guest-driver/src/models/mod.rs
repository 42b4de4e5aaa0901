//! Sample device models, built by name (`vfu-guest --model NAME`).

pub mod dma_engine;
pub mod gpio;

use thiserror::Error;

use crate::device::DeviceModel;

/// Names [`build`] knows.
pub const NAMES: &[&str] = &["dma-engine", "gpio"];

/// A model name [`build`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown device model {name:?}; known models: {}", NAMES.join(", "))]
pub struct UnknownModel {
    /// The name asked for.
    pub name: String,
}

/// A fresh instance of the model called `name`.
pub fn build(name: &str) -> Result<Box<dyn DeviceModel>, UnknownModel> {
    match name {
        "dma-engine" => Ok(Box::new(dma_engine::DmaEngine::new())),
        "gpio" => Ok(Box::new(gpio::Gpio::new())),
        _ => Err(UnknownModel {
            name: name.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed name builds, and an unknown name's error lists the valid ones.
    #[test]
    fn build_by_name() {
        for n in NAMES {
            assert!(build(n).is_ok(), "{n}");
        }
        let e = build("nope").err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown device model \"nope\"; known models: dma-engine, gpio"
        );
    }
}
