//! Active health probes.
