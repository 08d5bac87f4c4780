//! The iteration-level scheduler.
