//! Feeds arbitrary bytes to the FUSE request parser, as if read from `/dev/fuse`.
//!
//! The parser must never panic, and what it accepts must be self-consistent: the header's
//! length is the input's, a WRITE's payload is exactly its `size`, and anything with a readable
//! header keeps its `unique` so that the server can still answer it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use userdm_fuse::proto::abi::{InHeader, Wire};
use userdm_fuse::proto::{parse_request, Operation};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            assert_eq!(req.header.len as usize, data.len());
            if let Operation::Write(write, payload) = req.op {
                assert_eq!(payload.len(), write.size as usize);
            }
            let detached = req.op.detach();
            assert_eq!(detached.expects_reply(), req.op.expects_reply());
            // The header round-trips byte for byte.
            let mut bytes = [0u8; InHeader::SIZE];
            req.header.encode(&mut bytes).unwrap();
            assert_eq!(&bytes[..], &data[..InHeader::SIZE]);
        }
        Err(e) => {
            assert_eq!(e.unique().is_some(), data.len() >= InHeader::SIZE);
        }
    }
});
