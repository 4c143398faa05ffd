//! The request-framing tracker on arbitrary connection bytes: never panics, and finds the
//! same ambiguous request however the bytes are split across reads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let whole = trellis_gateway::fuzzing::ambiguous_request(input, input.len().max(1));
    let split = trellis_gateway::fuzzing::ambiguous_request(input, usize::from(step % 16) + 1);
    assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(input));
});
