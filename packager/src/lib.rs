//! keepup packager
