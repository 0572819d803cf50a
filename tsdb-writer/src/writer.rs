//! The batching writer between the processor and a store.
