//! The Detour lab.
