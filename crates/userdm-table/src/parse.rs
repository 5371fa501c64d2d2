//! dmsetup's table text.

use userdm_io::limits::{TABLE_ROWS_MAX, TARGET_PARAMS_BYTES_MAX};

use crate::TableError;

/// One row as written: where it starts, how long it is, which target and the target's params.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSpec {
    /// First sector of the row.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// Target type name, e.g. `linear`.
    pub target_type: String,
    /// The parameter string as written (trimmed).
    pub params: String,
    /// The line it came from (1-based), for error messages.
    pub line: usize,
}

impl RowSpec {
    /// The params split into words with the kernel's rules (whitespace separates, a backslash
    /// escapes the next character).
    pub fn args(&self) -> Vec<String> {
        split_params(&self.params)
    }

    /// The row back as one table line, `start len type params`.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.start, self.len, self.target_type, self.params
        )
    }
}

/// Parses table text. Rows are only checked for syntax here; [`crate::Table::build`] checks that
/// they are contiguous and that their targets accept their params.
pub fn parse_table_text(text: &str) -> Result<Vec<RowSpec>, TableError> {
    let mut rows = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        // dmsetup truncates at the first '#' anywhere on the line, so a literal '#' can never
        // reach a target; we do the same so that tables mean the same thing in both tools.
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if rows.len() >= TABLE_ROWS_MAX {
            return Err(TableError::Limit {
                line,
                problem: format!("more than {TABLE_ROWS_MAX} rows"),
            });
        }
        rows.push(parse_row(content, line)?);
    }
    Ok(rows)
}

fn parse_row(content: &str, line: usize) -> Result<RowSpec, TableError> {
    let syntax = |problem: String| TableError::Syntax { line, problem };
    let (start, rest) = next_word(content);
    let (len, rest) = next_word(rest);
    let (target_type, rest) = next_word(rest);
    if target_type.is_empty() {
        return Err(syntax(format!(
            "expected 'start length target [params...]', got '{content}'"
        )));
    }
    let start =
        parse_sector(start).ok_or_else(|| syntax(format!("invalid start sector '{start}'")))?;
    let len = parse_sector(len).ok_or_else(|| syntax(format!("invalid length '{len}'")))?;
    let params = rest.trim();
    if params.len() > TARGET_PARAMS_BYTES_MAX {
        return Err(TableError::Limit {
            line,
            problem: format!("parameters longer than {TARGET_PARAMS_BYTES_MAX} bytes"),
        });
    }
    Ok(RowSpec {
        start,
        len,
        target_type: target_type.to_string(),
        params: params.to_string(),
        line,
    })
}

fn next_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Sectors are plain decimal, as `%llu` reads them; we refuse signs and other bases rather than
/// guess.
fn parse_sector(word: &str) -> Option<u64> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// Splits params like the kernel's `dm_split_args`: whitespace separates words and a backslash
/// makes the next character literal (so `a\ b` is one word).
pub fn split_params(params: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = params.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                word.push(next);
            }
            in_word = true;
        } else if c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
        } else {
            word.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blank_lines_and_trailing_hash() {
        let rows =
            parse_table_text("# a comment\n\n  0 100 linear /dev/x 0  # trailing\n100 50 zero\n")
                .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].params, "/dev/x 0");
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[1].params, "");
        assert_eq!(rows[1].to_line(), "100 50 zero ");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse_table_text("0 100 zero\nx 5 zero\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: invalid start sector 'x'");
        let err = parse_table_text("0 100\n").unwrap_err();
        assert!(err.to_string().starts_with("line 1: expected"), "{err}");
        let err = parse_table_text("0 -5 zero\n").unwrap_err();
        assert_eq!(err.to_string(), "line 1: invalid length '-5'");
        let err = parse_table_text("0 99999999999999999999999 zero\n").unwrap_err();
        assert!(err.to_string().contains("invalid length"));
    }

    #[test]
    fn escapes() {
        assert_eq!(split_params(r"a\ b  c\\d e"), vec!["a b", r"c\d", "e"]);
        assert_eq!(split_params("  "), Vec::<String>::new());
        assert_eq!(split_params(r"x\"), vec!["x"]);
    }

    #[test]
    fn long_params_refused() {
        let text = format!("0 8 linear {}\n", "a".repeat(2000));
        assert!(matches!(
            parse_table_text(&text),
            Err(TableError::Limit { line: 1, .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,200}") {
            let _ = parse_table_text(&text);
        }

        #[test]
        fn rows_round_trip(rows in proptest::collection::vec((0u64..1<<40, 1u64..1<<30, "[a-z]{1,8}", "[a-z0-9 /]{0,30}"), 1..10)) {
            let text: String = rows.iter().map(|(s, l, t, p)| format!("{s} {l} {t} {p}\n")).collect();
            let parsed = parse_table_text(&text).unwrap();
            for (spec, (s, l, t, p)) in parsed.iter().zip(&rows) {
                proptest::prop_assert_eq!(spec.start, *s);
                proptest::prop_assert_eq!(spec.len, *l);
                proptest::prop_assert_eq!(&spec.target_type, t);
                proptest::prop_assert_eq!(&spec.params, p.trim());
            }
        }
    }
}
