//! The hub's ingest decoder: any body must decode to a Batch or an error,
//! never panic; a decoded Batch must re-encode and decode to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use shared_protocol::v1::Batch;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = Batch::decode(data) {
        let again = Batch::decode(batch.encode_to_vec().as_slice()).expect("re-decode");
        assert_eq!(again.encode_to_vec(), batch.encode_to_vec());
    }
});
