//! Table text from a user or a file: parsing and building must never panic, and a parsed table
//! must print back to text that parses to the same rows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use userdm_table::parse_table_text;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(rows) = parse_table_text(text) else { return };
    let printed: String = rows.iter().map(|r| r.to_line() + "\n").collect();
    let again = parse_table_text(&printed).expect("printed table must parse");
    assert_eq!(rows.len(), again.len());
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!((a.start, a.len, &a.target_type, &a.params), (b.start, b.len, &b.target_type, &b.params));
    }
});
