//! `cloud-hub audit verify --checkpoints FILE` reads checkpoint files and
//! JSON log lines shipped from elsewhere: hostile text. Any input gives the
//! checkpoints or an error naming the line, never a panic; every checkpoint
//! read back from its own line is the same checkpoint.
#![no_main]
use cloud_hub::audit::parse_checkpoints;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cps) = parse_checkpoints(text) {
        for cp in cps {
            let line = cp.to_line();
            assert_eq!(parse_checkpoints(&line).unwrap(), vec![cp]);
        }
    }
});
