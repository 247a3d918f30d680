//! JSON log lines, one object per event: `timestamp`, `level`, the event's fields (its
//! `message` first), `target`, then `span` (the current span's fields and `name`) and
//! `spans` (every entered span, root first), as tracing-subscriber's JSON format writes
//! them with `flatten_event` and the current span.
//!
//! Written straight from the event and from each span's fields as stored when recorded:
//! tracing-subscriber's own formatter stores a span's fields as a JSON object, then parses
//! that text back for every line logged inside the span, and keeps a map of values for
//! every span made: about a tenth of the gateway's instructions per push
//! (`bench/instructions.sh`).

use std::fmt::{self, Write as _};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How a span's fields are stored: the members of a JSON object without its braces
/// (`"a":1,"b":"x"`), in the order they were recorded.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonMembers;

impl<'w> FormatFields<'w> for JsonMembers {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut members = Members::new(&mut writer);
        fields.record(&mut members);
        members.result
    }

    /// Fields recorded after the span was made are appended; one recorded again replaces
    /// its earlier value (the stored members are then rebuilt, which is rare).
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        let mut members = Members::new(&mut added);
        members.names = Some(Vec::new());
        fields.record(&mut members);
        members.result?;
        let names = members.names.unwrap_or_default();
        if added.is_empty() {
            return Ok(());
        }
        if current.fields.is_empty() {
            current.fields = added;
            return Ok(());
        }
        let again = names
            .iter()
            .any(|name| current.fields.contains(&format!("\"{name}\":")));
        if !again {
            current.fields.push(',');
            current.fields.push_str(&added);
            return Ok(());
        }
        let parse = |members: &str| {
            serde_json::from_str::<Map<String, Value>>(&format!("{{{members}}}"))
                .map_err(|_| fmt::Error)
        };
        let mut all = parse(&current.fields)?;
        for (name, value) in parse(&added)? {
            all.insert(name, value);
        }
        let object = serde_json::to_string(&all).map_err(|_| fmt::Error)?;
        current.fields = object[1..object.len() - 1].to_owned();
        Ok(())
    }
}

/// The event format of [`JsonMembers`]' stored spans.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonMembers> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonMembers>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Members::new(&mut writer);
        fields.first = false;
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_str(&mut writer, meta.target())?;
        let current = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = current {
            writer.write_str(",\"span\":")?;
            write_span(&mut writer, &span)?;
        }
        if let Some(leaf) = ctx.lookup_current() {
            writer.write_str(",\"spans\":[")?;
            for (i, span) in leaf.scope().from_root().enumerate() {
                if i > 0 {
                    writer.write_char(',')?;
                }
                write_span(&mut writer, &span)?;
            }
            writer.write_char(']')?;
        }
        writer.write_str("}\n")
    }
}

/// `{<stored fields>,"name":"<span name>"}`.
fn write_span<S>(
    out: &mut Writer<'_>,
    span: &tracing_subscriber::registry::SpanRef<'_, S>,
) -> fmt::Result
where
    S: for<'a> LookupSpan<'a>,
{
    out.write_char('{')?;
    let extensions = span.extensions();
    if let Some(fields) = extensions.get::<FormattedFields<JsonMembers>>() {
        if !fields.fields.is_empty() {
            out.write_str(&fields.fields)?;
            out.write_char(',')?;
        }
    }
    out.write_str("\"name\":")?;
    write_str(out, span.metadata().name())?;
    out.write_char('}')
}

/// Writes each field visited as a JSON member, `,` before each but the first.
struct Members<'a, W: fmt::Write> {
    out: &'a mut W,
    first: bool,
    /// The names written, when kept (only [`JsonMembers::add_fields`] needs them).
    names: Option<Vec<&'static str>>,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> Members<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Members {
            out,
            first: true,
            names: None,
            result: Ok(()),
        }
    }

    /// The member's name and `:`; false after an earlier write failed.
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        if let Some(names) = &mut self.names {
            names.push(name);
        }
        let comma = if self.first { "" } else { "," };
        self.first = false;
        self.result = self
            .out
            .write_str(comma)
            .and_then(|()| write_str(self.out, name))
            .and_then(|()| self.out.write_char(':'));
        self.result.is_ok()
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.start(field) {
            self.result = self.out.write_fmt(value);
        }
    }

    /// A member whose value is `value` as a JSON string.
    fn quoted(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.start(field) {
            self.result = self
                .out
                .write_char('"')
                .and_then(|()| Escaped(self.out).write_fmt(value))
                .and_then(|()| self.out.write_char('"'));
        }
    }
}

impl<W: fmt::Write> Visit for Members<'_, W> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.quoted(field, format_args!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.start(field) {
            self.result = write_str(self.out, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.quoted(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // As serde_json writes it: a finite number, or null.
        let text = serde_json::to_string(&value).unwrap_or_else(|_| "null".to_owned());
        self.raw(field, format_args!("{text}"));
    }
}

/// `s` as a JSON string.
fn write_str<W: fmt::Write + ?Sized>(out: &mut W, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Writes what it is given escaped for the inside of a JSON string, as serde_json escapes
/// it: `"`, `\` and the control characters.
struct Escaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Captures what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What `log` writes with this module's format.
    fn ours(log: impl Fn()) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .fmt_fields(JsonMembers)
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        out.text()
    }

    /// The lines `log` writes with each formatter: ours, then tracing-subscriber's.
    fn both(log: impl Fn()) -> (Vec<Value>, Vec<Value>) {
        let ours = ours(&log);
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(theirs.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .finish();
        tracing::subscriber::with_default(subscriber, &log);
        let lines = |text: String| -> Vec<Value> {
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        };
        (lines(ours), lines(theirs.text()))
    }

    /// A line without its timestamp (which differs between the two runs), and the
    /// timestamp's shape checked.
    fn untimed(mut line: Value) -> Value {
        let ts = line["timestamp"].as_str().expect("a timestamp").to_owned();
        assert!(
            time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{ts}"
        );
        line.as_object_mut().unwrap().remove("timestamp");
        line
    }

    #[derive(Debug)]
    struct Oops;
    impl fmt::Display for Oops {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it \"broke\"\n\tbadly \u{1}")
        }
    }
    impl std::error::Error for Oops {}

    #[test]
    fn lines_match_tracing_subscribers_json_format() {
        let (ours, theirs) = both(|| {
            tracing::info!("outside any span");
            let request = tracing::info_span!(
                "request",
                request.id = %"r-1",
                http.method = "POST",
                client = tracing::field::Empty,
            );
            let _request = request.enter();
            request.record("client", "ops \"team\"");
            tracing::warn!(push.id = %"p-1", count = 3_u64, delta = -2_i64, ok = true, ratio = 0.5, "first");
            let send = tracing::info_span!("umeng.send", umeng.tokens = 2_usize);
            let _send = send.enter();
            let err = Oops;
            tracing::error!(error = &err as &(dyn std::error::Error + 'static), detail = ?vec!["a", "b"], "escaped: \\ / \u{7f} 中文");
        });
        assert_eq!(ours.len(), 3);
        assert_eq!(
            ours.into_iter().map(untimed).collect::<Vec<_>>(),
            theirs.into_iter().map(untimed).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_message_comes_first_and_a_span_field_recorded_again_keeps_one_value() {
        let text = ours(|| {
            let span = tracing::info_span!("s", a = 1_u64, b = tracing::field::Empty);
            let _s = span.enter();
            span.record("b", "x");
            span.record("a", 2_u64);
            tracing::info!(z = 1_u64, "hello");
        });
        let line = text.lines().next().expect("a line");
        assert!(
            line.starts_with("{\"timestamp\":\"")
                && line.contains("\",\"level\":\"INFO\",\"message\":\"hello\",\"z\":1,\"target\":"),
            "{line}"
        );
        assert_eq!(
            line.matches("\"a\":").count(),
            2,
            "once in span, once in spans: {line}"
        );
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["span"], json!({"a": 2, "b": "x", "name": "s"}));
        assert_eq!(v["spans"], json!([{"a": 2, "b": "x", "name": "s"}]));
    }
}
