//! Numbers that JSON parsing would change: integers beyond i64/u64 and decimals with more
//! precision than an f64 holds. They are refused (422, naming the field) rather than
//! rounded, so what reaches Umeng is what the caller wrote, and two different requests
//! never share a fingerprint.
//!
//! The check reads the request's JSON text: once parsed, `123456789012345678901234567890`
//! and `123456789012345678901234567891` are the same `f64` and the difference is gone.
//!
//! Why refuse instead of keeping them with serde_json's `arbitrary_precision`: that
//! feature is crate-wide (the simulator, the stores' JSON columns and every `Value` would
//! change representation), and untagged enums such as the request's `Badge` then fail to
//! read numbers, because serde buffers them as a private map.

use crate::umeng::FieldError;

/// At most this many numbers are named; the rest are summarised.
const MAX_LISTED: usize = 20;
/// Deeper nesting is not walked (serde_json refuses bodies nested beyond 128 levels).
const MAX_DEPTH: usize = 256;

/// An error for every number in `json` (a JSON text) that would not come back unchanged
/// after parsing and serialising it again, named by its path (`notification.extra.n`,
/// `umeng.payload.body.k[2]`). A text that is not valid JSON gives no errors here (the
/// parser reports it).
pub fn inexact_numbers(json: &[u8]) -> Vec<FieldError> {
    let mut walker = Walker {
        s: json,
        i: 0,
        path: String::new(),
        found: Vec::new(),
        more: 0,
    };
    walker.skip_ws();
    if walker.value(0).is_none() {
        return Vec::new();
    }
    let mut errors = walker.found;
    if walker.more > 0 {
        errors.push(FieldError::new(
            "(body)",
            format!(
                "{} more numbers beyond exact precision not listed",
                walker.more
            ),
        ));
    }
    errors
}

/// Whether the number literal `text` survives a round trip through `serde_json::Value`:
/// an integer that fits i64 or u64 (a larger one would become a float), or a decimal whose
/// value equals that of what serde_json writes back for it.
pub fn is_exact(text: &str) -> bool {
    let integer = !text.contains(['.', 'e', 'E']);
    if integer {
        return text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok();
    }
    // Parse exactly as the request body was parsed, then write it back.
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    match (decimal(text), decimal(&v.to_string())) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A decimal literal as (significant digits without leading or trailing zeros, exponent
/// of the last digit); zero is `("", 0)` whatever its sign. `None` if the exponent is
/// absurd.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let frac_len = i64::try_from(frac.len()).ok()?;
    let mut exp = exp.checked_sub(frac_len)?;
    let trimmed = digits.trim_start_matches('0');
    let significant = trimmed.trim_end_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let trailing = i64::try_from(trimmed.len() - significant.len()).ok()?;
    exp = exp.checked_add(trailing)?;
    Some((negative, significant.to_owned(), exp))
}

struct Walker<'a> {
    s: &'a [u8],
    i: usize,
    path: String,
    found: Vec<FieldError>,
    more: usize,
}

impl Walker<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        self.skip_ws();
        (self.peek() == Some(b)).then(|| self.i += 1)
    }

    /// One value at the cursor; `None` when the text is not JSON.
    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_ws();
        match self.peek()? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.s.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string at the cursor; returns its raw text including the quotes.
    fn string(&mut self) -> Option<&[u8]> {
        let start = self.i;
        self.i += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return self.s.get(start..self.i);
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }

    fn number(&mut self) -> Option<()> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.i += 1;
        }
        let text = std::str::from_utf8(self.s.get(start..self.i)?).ok()?;
        if text.is_empty() {
            return None;
        }
        if !is_exact(text) {
            if self.found.len() < MAX_LISTED {
                let field = if self.path.is_empty() {
                    "(body)".to_owned()
                } else {
                    self.path.clone()
                };
                self.found.push(FieldError::new(
                    field,
                    format!(
                        "the number {} cannot be kept exactly (beyond 64-bit integer or double \
                         precision); send it as a string",
                        shorten(text)
                    ),
                ));
            } else {
                self.more += 1;
            }
        }
        Some(())
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        self.i += 1;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.skip_ws();
            if self.peek()? != b'"' {
                return None;
            }
            let raw_key = self.string()?;
            let key: String = serde_json::from_slice(raw_key).ok()?;
            self.eat(b':')?;
            let len = self.path.len();
            if !self.path.is_empty() {
                self.path.push('.');
            }
            self.path.push_str(&key);
            let walked = self.value(depth + 1);
            self.path.truncate(len);
            walked?;
            if self.eat(b',').is_some() {
                continue;
            }
            return self.eat(b'}');
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.i += 1;
        if self.eat(b']').is_some() {
            return Some(());
        }
        let mut index = 0usize;
        loop {
            let len = self.path.len();
            self.path.push_str(&format!("[{index}]"));
            let walked = self.value(depth + 1);
            self.path.truncate(len);
            walked?;
            index += 1;
            if self.eat(b',').is_some() {
                continue;
            }
            return self.eat(b']');
        }
    }
}

/// The literal, cut to 40 characters for the error message.
fn shorten(text: &str) -> String {
    if text.len() <= 40 {
        text.to_owned()
    } else {
        format!("{}…", &text[..40])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Vec<String> {
        inexact_numbers(json.as_bytes())
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn exact_numbers_pass() {
        for t in [
            "0",
            "-0",
            "42",
            "-9223372036854775808",
            "18446744073709551615",
            "1.5",
            "1.50",
            "0.1",
            "-2.25e3",
            "1e2",
            "1E-7",
            "0.0",
            "-0.0",
            "1.2345678901234568e29",
            "123456789.125",
        ] {
            assert!(is_exact(t), "{t}");
        }
    }

    #[test]
    fn numbers_that_would_change_are_found() {
        for t in [
            "123456789012345678901234567890",
            "18446744073709551616",
            "-9223372036854775809",
            "0.12345678901234567890123",
            "1.00000000000000000001",
            "9007199254740993.0",
            "1e-400",
        ] {
            assert!(!is_exact(t), "{t}");
        }
    }

    #[test]
    fn errors_name_the_path() {
        let json = r#"{"app":"a","notification":{"extra":{"n":123456789012345678901234567890,"ok":1.5}},
                      "umeng":{"x":[1, 2, 0.12345678901234567890123]},"a\"b":{"c.d":99999999999999999999}}"#;
        assert_eq!(
            fields(json),
            ["notification.extra.n", "umeng.x[2]", "a\"b.c.d"]
        );
        assert!(fields(r#"{"n": 1, "s": "123456789012345678901234567890"}"#).is_empty());
        assert!(fields("not json").is_empty());
    }

    #[test]
    fn many_are_summarised() {
        let list = vec!["1e-400"; 30].join(",");
        let errors = inexact_numbers(format!("{{\"l\":[{list}]}}").as_bytes());
        assert_eq!(errors.len(), MAX_LISTED + 1);
        assert!(errors[MAX_LISTED].message.contains("10 more"), "{errors:?}");
    }
}
