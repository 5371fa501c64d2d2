//! dm-user's reply stream, as userdm's `user` target parses it: arbitrary bytes, split at
//! arbitrary points, against a model of requests in flight on one channel. The parser must
//! never panic, and the events must not depend on where the stream was split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use userdm_dmuser::wire::{
    DmUserMessage, MessageHandler, MessageReader, DM_USER_REQ_MAP_READ, DM_USER_REQ_MAP_WRITE,
};
use userdm_io::Errno;

/// Requests 0..16 are in flight: even seqs are READs of (seq + 1) * 3 bytes, odd ones WRITEs.
#[derive(Default, PartialEq, Debug)]
struct Model {
    answered: Vec<bool>,
    events: Vec<(u8, u64, u64, u64)>,
}

impl MessageHandler for Model {
    fn header(&mut self, reply: &DmUserMessage) -> Result<u64, Errno> {
        if self.answered.is_empty() {
            self.answered = vec![false; 16];
        }
        let seq = usize::try_from(reply.seq).ok().filter(|&s| s < 16).ok_or(Errno::EINVAL)?;
        if std::mem::replace(&mut self.answered[seq], true) {
            return Err(Errno::EINVAL);
        }
        let kind = if seq % 2 == 0 { DM_USER_REQ_MAP_READ } else { DM_USER_REQ_MAP_WRITE };
        let req = DmUserMessage { seq: reply.seq, kind, len: (reply.seq + 1) * 3, ..Default::default() };
        self.events.push((0, reply.seq, reply.kind, 0));
        Ok(req.reply_payload_bytes(reply.kind))
    }

    fn payload(&mut self, msg: &DmUserMessage, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.events.push((1, msg.seq, offset + i as u64, u64::from(*b)));
        }
    }

    fn complete(&mut self, msg: &DmUserMessage) {
        self.events.push((2, msg.seq, 0, 0));
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&cuts, stream)) = input.split_first() else {
        return;
    };
    let mut whole = Model::default();
    let whole_res = MessageReader::new().feed(stream, &mut whole);

    // Split into pieces whose sizes cycle through 1..=cuts+1.
    let mut split = Model::default();
    let mut reader = MessageReader::new();
    let mut at = 0;
    let mut step = 1usize;
    let mut split_res = Ok(0);
    while at < stream.len() {
        let end = (at + step).min(stream.len());
        match reader.feed(&stream[at..end], &mut split) {
            Ok(_) => {}
            Err(e) => {
                split_res = Err(e);
                break;
            }
        }
        at = end;
        step = step % (usize::from(cuts) + 1) + 1;
    }
    assert_eq!(whole.events, split.events);
    assert_eq!(whole_res.is_err(), split_res.is_err());
    if whole_res.is_err() {
        assert!(reader.error().is_some());
    }
});
