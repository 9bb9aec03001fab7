//! Fleet test support.
