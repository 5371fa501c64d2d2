//! The `user` row's parameters: dm-user's three, then userdm's optional `key=value` words.

use std::fmt::Write as _;
use std::time::Duration;

use userdm_io::limits::QUEUE_DEPTH_MAX;
use userdm_table::TableError;

/// What happens to requests a daemon has read but not answered when its channel closes (the
/// daemon exits, crashes, or breaks the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnClose {
    /// Give them to the next channel that reads, or to the next daemon that connects (userdm's
    /// default; dm-user cannot do this).
    #[default]
    Requeue,
    /// Fail them with EIO, as dm-user does.
    Fail,
}

/// A `user` row's parameters, parsed.
///
/// ```text
/// <arg0> <arg1> <ctl> [timeout_ms=N] [on_close=requeue|fail] [owner=UID:GID] [mode=0600|0660]
///                     [queue_depth=N]
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserParams {
    /// dm-user's first argument, accepted and ignored as dm-user does.
    pub arg0: String,
    /// dm-user's second argument, accepted and ignored as dm-user does.
    pub arg1: String,
    /// The control endpoint's name: `$USERDM_DMUSER_DIR/<ctl>`.
    pub ctl: String,
    /// With no daemon connected, fail a request after this long; `None` waits forever (dm-user
    /// v1, the default). The Android kernel's value is 4000 ms.
    pub timeout: Option<Duration>,
    /// What happens to requests in flight on a channel that closes.
    pub on_close: OnClose,
    /// The endpoint's owner, `UID:GID`; `None` leaves it to the control plane's default.
    pub owner: Option<(u32, u32)>,
    /// The endpoint's mode, 0600 or 0660; `None` leaves it to the control plane's default.
    pub mode: Option<u32>,
    /// Requests the endpoint holds at once (queued plus in flight); `None` for the default.
    pub queue_depth: Option<u16>,
}

fn bad(problem: impl Into<String>) -> TableError {
    TableError::Target {
        line: 0,
        target: "user".to_string(),
        problem: problem.into(),
    }
}

fn parse_u32(word: &str) -> Option<u32> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// Checks a control endpoint name: one path component, printable, not `.` or `..`.
pub fn check_ctl_name(ctl: &str) -> Result<(), TableError> {
    if ctl.is_empty() || ctl == "." || ctl == ".." {
        return Err(bad(format!("invalid control name '{ctl}'")));
    }
    if ctl.contains('/') {
        return Err(bad(format!(
            "invalid control name '{ctl}': it must not contain '/'"
        )));
    }
    if ctl.chars().any(char::is_control) {
        return Err(bad("invalid control name: it contains control characters"));
    }
    Ok(())
}

impl UserParams {
    /// Parses the words of a `user` row.
    pub fn parse(args: &[String]) -> Result<UserParams, TableError> {
        if args.len() < 3 {
            return Err(bad(format!(
                "expected '<arg0> <arg1> <ctl> [options]', got {} argument{}",
                args.len(),
                if args.len() == 1 { "" } else { "s" }
            )));
        }
        check_ctl_name(&args[2])?;
        let mut p = UserParams {
            arg0: args[0].clone(),
            arg1: args[1].clone(),
            ctl: args[2].clone(),
            timeout: None,
            on_close: OnClose::Requeue,
            owner: None,
            mode: None,
            queue_depth: None,
        };
        for word in &args[3..] {
            let Some((key, value)) = word.split_once('=') else {
                return Err(bad(format!(
                    "unexpected argument '{word}': options are key=value (timeout_ms, on_close, \
                     owner, mode, queue_depth)"
                )));
            };
            p.set(key, value)?;
        }
        Ok(p)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), TableError> {
        let invalid = |why: &str| bad(format!("invalid {key} '{value}': {why}"));
        match key {
            "timeout_ms" => {
                let ms = parse_u32(value).ok_or_else(|| invalid("expected milliseconds"))?;
                self.timeout = Some(Duration::from_millis(u64::from(ms)));
            }
            "on_close" => {
                self.on_close = match value {
                    "requeue" => OnClose::Requeue,
                    "fail" => OnClose::Fail,
                    _ => return Err(invalid("expected 'requeue' or 'fail'")),
                }
            }
            "owner" => {
                let (uid, gid) = value
                    .split_once(':')
                    .and_then(|(u, g)| Some((parse_u32(u)?, parse_u32(g)?)))
                    .ok_or_else(|| invalid("expected numeric UID:GID"))?;
                self.owner = Some((uid, gid));
            }
            "mode" => {
                let mode = u32::from_str_radix(value, 8)
                    .ok()
                    .filter(|m| [0o600, 0o660].contains(m))
                    .ok_or_else(|| invalid("expected 0600 or 0660"))?;
                self.mode = Some(mode);
            }
            "queue_depth" => {
                let depth = parse_u32(value)
                    .and_then(|d| u16::try_from(d).ok())
                    .filter(|d| (1..=QUEUE_DEPTH_MAX).contains(d))
                    .ok_or_else(|| invalid(&format!("expected 1 to {QUEUE_DEPTH_MAX}")))?;
                self.queue_depth = Some(depth);
            }
            _ => {
                return Err(bad(format!(
                    "unknown option '{key}' (known: timeout_ms, on_close, owner, mode, \
                     queue_depth)"
                )))
            }
        }
        Ok(())
    }

    /// The parameters as `dmsetup table` prints them: dm-user's three words, then the options
    /// given, in a fixed order.
    pub fn to_table_params(&self) -> String {
        let mut s = format!(
            "{} {} {}",
            escape(&self.arg0),
            escape(&self.arg1),
            escape(&self.ctl)
        );
        if let Some(t) = self.timeout {
            let _ = write!(s, " timeout_ms={}", t.as_millis());
        }
        if self.on_close == OnClose::Fail {
            s.push_str(" on_close=fail");
        }
        if let Some((u, g)) = self.owner {
            let _ = write!(s, " owner={u}:{g}");
        }
        if let Some(m) = self.mode {
            let _ = write!(s, " mode={m:04o}");
        }
        if let Some(d) = self.queue_depth {
            let _ = write!(s, " queue_depth={d}");
        }
        s
    }
}

fn escape(word: &str) -> String {
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

    fn words(s: &str) -> Vec<String> {
        userdm_table::split_params(s)
    }

    #[test]
    fn dm_user_form_stays_valid() {
        let p = UserParams::parse(&words("0 1024 ctl")).unwrap();
        assert_eq!(p.ctl, "ctl");
        assert_eq!(p.timeout, None);
        assert_eq!(p.on_close, OnClose::Requeue);
        assert_eq!(p.to_table_params(), "0 1024 ctl");
        // dm-user ignores its first two arguments, whatever they are.
        assert_eq!(UserParams::parse(&words("x y z")).unwrap().ctl, "z");
    }

    #[test]
    fn options_round_trip() {
        let text =
            "0 1024 ctl timeout_ms=4000 on_close=fail owner=1000:1000 mode=0660 queue_depth=32";
        let p = UserParams::parse(&words(text)).unwrap();
        assert_eq!(p.timeout, Some(Duration::from_secs(4)));
        assert_eq!(p.owner, Some((1000, 1000)));
        assert_eq!(p.mode, Some(0o660));
        assert_eq!(p.queue_depth, Some(32));
        assert_eq!(p.to_table_params(), text);
        assert_eq!(UserParams::parse(&words(&p.to_table_params())).unwrap(), p);
    }

    #[test]
    fn bad_params_are_named() {
        let err = |s: &str| UserParams::parse(&words(s)).unwrap_err().to_string();
        assert!(err("0 1024").contains("got 2 arguments"));
        assert!(err("0 1024 a/b").contains("must not contain '/'"));
        assert!(err("0 1024 ..").contains("invalid control name"));
        assert!(err("0 1024 ctl extra").contains("unexpected argument 'extra'"));
        assert!(err("0 1024 ctl timeout_ms=-1").contains("invalid timeout_ms '-1'"));
        assert!(err("0 1024 ctl on_close=maybe").contains("invalid on_close"));
        assert!(err("0 1024 ctl owner=root:root").contains("numeric UID:GID"));
        assert!(err("0 1024 ctl mode=0666").contains("0600 or 0660"));
        assert!(err("0 1024 ctl queue_depth=0").contains("invalid queue_depth"));
        assert!(err("0 1024 ctl colour=blue").contains("unknown option 'colour'"));
    }
}
