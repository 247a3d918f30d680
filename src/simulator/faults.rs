//! Choosing the injected fault for a request, and how a fault is named in the records.

use super::{Fault, FaultKind};

/// Takes the first fault matching `appkey` and `path`, counting one use against its
/// `times`; a fault whose uses are spent is removed.
pub(crate) fn take_fault(
    faults: &mut Vec<Fault>,
    appkey: Option<&str>,
    path: &str,
) -> Option<FaultKind> {
    faults.retain(|f| f.times != Some(0));
    let index = faults.iter().position(|f| {
        f.appkey.as_deref().is_none_or(|a| Some(a) == appkey)
            && f.path.as_deref().is_none_or(|p| p == path)
    })?;
    let fault = &mut faults[index];
    let kind = fault.kind.clone();
    if let Some(times) = fault.times.as_mut() {
        *times -= 1;
        if *times == 0 {
            faults.remove(index);
        }
    }
    Some(kind)
}

/// The short name of a fault in a [`super::RecordedRequest`].
pub(crate) fn describe(kind: &FaultKind) -> String {
    match kind {
        FaultKind::Latency { ms } => format!("latency({ms}ms)"),
        FaultKind::Hang => "hang".to_owned(),
        FaultKind::HttpStatus { status } => format!("http_status({status})"),
        FaultKind::Drop => "drop".to_owned(),
        FaultKind::ErrorCode { code, .. } => format!("error_code({code})"),
        FaultKind::Answer { status, .. } => format!("answer({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(appkey: Option<&str>, path: Option<&str>, times: Option<u32>, ms: u64) -> Fault {
        Fault {
            appkey: appkey.map(str::to_owned),
            path: path.map(str::to_owned),
            kind: FaultKind::Latency { ms },
            times,
        }
    }

    #[test]
    fn scoping_and_times() {
        let mut faults = vec![
            fault(Some("a"), Some("/api/send"), Some(1), 1),
            fault(None, Some("/upload"), None, 2),
        ];
        assert_eq!(take_fault(&mut faults, Some("b"), "/api/send"), None);
        assert_eq!(
            take_fault(&mut faults, Some("a"), "/api/send"),
            Some(FaultKind::Latency { ms: 1 })
        );
        assert_eq!(take_fault(&mut faults, Some("a"), "/api/send"), None);
        assert_eq!(faults.len(), 1);
        for _ in 0..3 {
            assert_eq!(
                take_fault(&mut faults, None, "/upload"),
                Some(FaultKind::Latency { ms: 2 })
            );
        }
    }

    #[test]
    fn zero_times_never_fires() {
        let mut faults = vec![fault(None, None, Some(0), 1)];
        assert_eq!(take_fault(&mut faults, None, "/api/send"), None);
        assert!(faults.is_empty());
    }

    #[test]
    fn fault_json_shape() {
        let f: Fault = serde_json::from_str(
            r#"{"path":"/api/send","kind":{"kind":"error_code","code":"2050"},"times":2}"#,
        )
        .expect("valid fault json");
        assert_eq!(f.appkey, None);
        assert_eq!(
            f.kind,
            FaultKind::ErrorCode {
                code: "2050".to_owned(),
                message: None
            }
        );
    }
}
