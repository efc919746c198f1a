//! Shared support for husk's end-to-end tests.
