//! Umeng's request signature: `md5("POST" + url + body + app_master_secret)`, lower-case hex.

use md5::{Digest, Md5};

/// Signs one request. `url` is scheme + host + path with no query string; `body` is the
/// exact byte string that is sent. Returns 32 lower-case hex characters.
pub fn sign(url: &str, body: &[u8], secret: &str) -> String {
    let mut h = Md5::new();
    h.update(b"POST");
    h.update(url.as_bytes());
    h.update(body);
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::sign;

    const SEND: &str = "https://msgapi.umeng.com/api/send";
    const SECRET: &str = "testsecret0123456789abcdefghijkl";
    const BODY: &str = r#"{"appkey":"5f0000000000000000000001","timestamp":"1700000000","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{"display_type":"notification","body":{"ticker":"hi","title":"hi","text":"hello","after_open":"go_app"}},"production_mode":"false"}"#;

    #[test]
    fn go_test_vector() {
        assert_eq!(
            sign(SEND, br#"{"a":1}"#, "sec"),
            "6fa5dbccea0287bdd8627437ce27ccfa"
        );
    }

    #[test]
    fn worked_example() {
        assert_eq!(BODY.len(), 283);
        assert_eq!(
            sign(SEND, BODY.as_bytes(), SECRET),
            "fe4cbc06048ead98f6a4b4500b081617"
        );
    }

    #[test]
    fn http_host_changes_the_sign() {
        assert_eq!(
            sign("http://msg.umeng.com/api/send", BODY.as_bytes(), SECRET),
            "ff49635212a2c7f888b30d9836a729e1"
        );
    }

    #[test]
    fn status_vector() {
        let body = r#"{"appkey":"5f0000000000000000000001","timestamp":"1700000000","task_id":"us12345678901234567890"}"#;
        assert_eq!(
            sign(
                "https://msgapi.umeng.com/api/status",
                body.as_bytes(),
                SECRET
            ),
            "3f3f3b3b91ee0803f732d7e191840cfb"
        );
    }

    #[test]
    fn escaping_changes_the_sign() {
        assert_eq!(
            sign(SEND, "{\"text\":\"你好\"}".as_bytes(), SECRET),
            "4001f83a1b400ed9d1953e0045aa802f"
        );
        assert_eq!(
            sign(SEND, br#"{"text":"\u4f60\u597d"}"#, SECRET),
            "f7d8fafe357cb147025a5d517eabf5b5"
        );
    }
}
