//! FHIR search parameters from an untrusted query: any (name, value)
//! pairs must parse into a search or a clear error naming a parameter,
//! never panic; dates parse or fail on their own, and an accepted page
//! size never exceeds the maximum.
#![no_main]
use cloud_hub::fhir::{is_valid_id, parse_date_param, parse_search};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(String, String)> = text
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect();
    for (_, v) in &pairs {
        let _ = parse_date_param(v);
        let _ = is_valid_id(v);
    }
    if let Ok(s) = parse_search(&pairs) {
        assert!(
            s.count <= cloud_hub::fhir::MAX_COUNT,
            "page size above the maximum"
        );
    }
});
