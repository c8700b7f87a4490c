//! The pure parts of the hub's Kafka / Event Hubs source: what a record's
//! headers say ([`headers`]: IoT Hub routing properties, plain UTF-8 or
//! AMQP-encoded) and which partitions a replica should hold ([`lease`]).
//! No I/O: the transport crate reads the records, the storage crates keep
//! the leases and offsets.

pub mod headers;
pub mod lease;
