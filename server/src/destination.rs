//! Mapping a request path to a file below the files root, refusing every way out of it.

use bitsd_protocol::BitsError;

/// The destination of an upload to `path` on a route with `prefix`: the part after the prefix,
/// percent-decoded segment by segment, joined with `/`. `Ok(None)` when nothing follows the
/// prefix. Refused with 403 `E_ACCESSDENIED`: `..` and `.` segments, empty segments, encoded
/// separators (`%2f`, `%5c`), backslashes, NUL and control characters, drive letters and
/// other `:` uses, and segments starting with `.` (reserved for bitsd's temporary files).
pub(crate) fn destination_for(prefix: &str, path: &str) -> Result<Option<String>, BitsError> {
    let Some(rest) = path.strip_prefix(prefix) else {
        return Err(BitsError::access_denied(format!(
            "{path} is not below {prefix}"
        )));
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let deny = |why: &str| BitsError::access_denied(format!("destination {path:?} refused: {why}"));
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        if raw.is_empty() {
            return Err(deny("empty path segment"));
        }
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| deny("not UTF-8"))?;
        if decoded == "." || decoded == ".." {
            return Err(deny("dot segment"));
        }
        if decoded.starts_with('.') {
            return Err(deny("segment starts with a dot"));
        }
        if decoded
            .chars()
            .any(|c| c == '/' || c == '\\' || c == ':' || c.is_control())
        {
            return Err(deny("separator, drive or control character"));
        }
        segments.push(decoded.into_owned());
    }
    Ok(Some(segments.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_plain_paths() {
        assert_eq!(
            destination_for("/upload/", "/upload/a/b.bin")
                .unwrap()
                .as_deref(),
            Some("a/b.bin")
        );
        assert_eq!(
            destination_for("/upload/", "/upload/report%20v2.bin")
                .unwrap()
                .as_deref(),
            Some("report v2.bin")
        );
        assert_eq!(destination_for("/upload/", "/upload/").unwrap(), None);
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "/upload/../x",
            "/upload/%2e%2e/x",
            "/upload/%2E%2E/x",
            "/upload/a%2fb",
            "/upload/a%2Fb",
            "/upload/a%5cb",
            "/upload/a\\b",
            "/upload/C:/x",
            "/upload/c%3a%5cwindows",
            "/upload//etc/passwd",
            "/upload/a/./b",
            "/upload/%00",
            "/upload/.hidden",
            "/upload/a/",
        ] {
            let e = destination_for("/upload/", bad).unwrap_err();
            assert_eq!(e.status(), 403, "{bad}");
        }
    }
}
