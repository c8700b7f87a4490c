//! What the dashboard's gateways view sums over a gateway's recent batches.

use prost::Message;
use shared_protocol::v1::BatchAck;

/// Batches of a window and the totals of their acks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub batches: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

impl BatchCounts {
    /// Counts one batch with its stored (encoded) ack. An ack that does not
    /// decode (written by this hub; never expected) counts the batch only.
    pub fn add(&mut self, encoded_ack: &[u8]) {
        self.batches += 1;
        if let Ok(a) = BatchAck::decode(encoded_ack) {
            self.accepted += u64::from(a.accepted);
            self.duplicates += u64::from(a.duplicates);
            self.rejected += u64::from(a.rejected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_summed_and_an_undecodable_one_counts_the_batch_only() {
        let mut c = BatchCounts::default();
        let ack = BatchAck {
            accepted: 3,
            duplicates: 1,
            rejected: 2,
            ..Default::default()
        };
        c.add(&ack.encode_to_vec());
        c.add(&ack.encode_to_vec());
        c.add(&[0xff, 0xff, 0xff]);
        assert_eq!(
            c,
            BatchCounts {
                batches: 3,
                accepted: 6,
                duplicates: 2,
                rejected: 4
            }
        );
    }
}
