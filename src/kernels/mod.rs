//! The backend ops the model is written against, and the backends that supply them.

pub mod cpu;
pub mod dtype;
pub mod host;
