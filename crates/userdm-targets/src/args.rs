//! Parameter parsing shared by the targets, with the kernel's rules.

use userdm_table::TableError;

/// A construction error of `target`. The line is filled in by `Table::build`.
#[cold]
pub(crate) fn target_error(target: &str, problem: impl Into<String>) -> TableError {
    TableError::Target {
        line: 0,
        target: target.to_string(),
        problem: problem.into(),
    }
}

/// A plain decimal number, as the kernel's `sscanf("%llu%c")` accepts it when the `%c` must not
/// match: digits only, nothing after. We also refuse signs and overflow, which the kernel's
/// scanner would silently misread.
pub(crate) fn parse_u64(word: &str) -> Option<u64> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// As [`parse_u64`], for `%u` and `kstrtouint` fields.
pub(crate) fn parse_u32(word: &str) -> Option<u32> {
    parse_u64(word).and_then(|v| u32::try_from(v).ok())
}

/// The kernel's `struct dm_arg_set`: the remaining words, consumed from the front.
pub(crate) struct ArgSet<'a> {
    words: &'a [String],
}

impl<'a> ArgSet<'a> {
    pub(crate) fn new(words: &'a [String]) -> ArgSet<'a> {
        ArgSet { words }
    }

    /// How many words are left.
    pub(crate) fn remaining(&self) -> usize {
        self.words.len()
    }

    /// The next word, if any (`dm_shift_arg`).
    pub(crate) fn shift(&mut self) -> Option<&'a str> {
        let (first, rest) = self.words.split_first()?;
        self.words = rest;
        Some(first.as_str())
    }

    /// The next word as a number in `min..=max`, or `None` (`dm_read_arg`).
    pub(crate) fn read_u32(&mut self, min: u32, max: u32) -> Option<u32> {
        self.shift()
            .and_then(parse_u32)
            .filter(|v| (min..=max).contains(v))
    }

    /// A group count (`dm_read_arg_group`): a number in `min..=max` that is no larger than the
    /// number of words after it.
    pub(crate) fn read_group(&mut self, min: u32, max: u32) -> Option<u32> {
        let count = self.read_u32(min, max)?;
        (count as usize <= self.remaining()).then_some(count)
    }
}

/// Escapes a path for table output so that it reads back as one word (a backslash makes the next
/// character literal when tables are parsed). The kernel never needs this because it prints
/// `maj:min`; we print file paths.
pub(crate) fn escape_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if c.is_whitespace() || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_the_kernel() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("+1"), None);
        assert_eq!(parse_u64("12x"), None);
        assert_eq!(parse_u64("0x10"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u32("4294967296"), None);
    }

    #[test]
    fn arg_groups() {
        let words: Vec<String> = ["2", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut args = ArgSet::new(&words);
        assert_eq!(args.read_group(0, 11), Some(2));
        assert_eq!(args.shift(), Some("a"));
        assert_eq!(args.remaining(), 2);
        let words: Vec<String> = ["3", "a"].iter().map(|s| s.to_string()).collect();
        assert_eq!(ArgSet::new(&words).read_group(0, 11), None);
    }

    #[test]
    fn escaping_round_trips() {
        let path = r"/tmp/a b\c";
        let escaped = escape_word(path);
        assert_eq!(userdm_table::split_params(&escaped), vec![path.to_string()]);
        assert_eq!(escape_word("/dev/loop0"), "/dev/loop0");
    }
}
