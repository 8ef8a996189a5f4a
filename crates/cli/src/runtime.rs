//! The async runtime every command runs its library calls on.

pub(crate) use streetflow_lake::runtime;
