//! TOML syntax errors in words a person can act on.

/// What to tell a person about a TOML parse error at `offset` of `text`, given the parser's
/// own `message`: the common mistakes get a plain explanation and the fix, everything else
/// keeps the parser's message.
pub(super) fn explain_toml_error(text: &str, offset: Option<usize>, message: &str) -> String {
    let message = message.trim();
    let Some(offset) = offset else {
        return message.to_owned();
    };
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let Some((key, value)) = line.split_once('=') else {
        return message.to_owned();
    };
    let key = key.trim();
    let value = value.trim();
    let bare_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !bare_key || value.is_empty() {
        return message.to_owned();
    }
    if matches!(
        value,
        "True" | "TRUE" | "False" | "FALSE" | "yes" | "no" | "on"
    ) {
        return format!(
            "{key} = {value}: booleans are written true or false, in lower case ({message})"
        );
    }
    let quotable =
        !value.starts_with(['"', '\'', '[', '{']) && !value.contains('"') && !value.contains('\\');
    if quotable {
        let quoted = format!("{key} = \"{value}\"");
        if toml::from_str::<toml::Table>(&quoted).is_ok() {
            return format!("{key} = {value}: string values need quotes: write {quoted}");
        }
    }
    message.to_owned()
}

/// Byte offset of the line that sets `key` (`key = ...`, indentation allowed).
pub(super) fn key_offset(text: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return Some(offset + (line.len() - trimmed.len()));
            }
        }
        offset += line.len();
    }
    None
}

/// An I/O error in words, without the `(os error N)` tail.
pub(super) fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(text: &str) -> String {
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        explain_toml_error(text, e.span().map(|s| s.start), e.message())
    }

    #[test]
    fn unquoted_strings_are_named() {
        let m = explain("data_dir = \"d\"\nlisten = 127.0.0.1:8080\n");
        assert!(m.contains("string values need quotes"), "{m}");
        assert!(m.contains("listen = \"127.0.0.1:8080\""), "{m}");
        let m = explain("data_dir = /var/lib/bitsd\n");
        assert!(m.contains("data_dir = \"/var/lib/bitsd\""), "{m}");
        let m = explain("fsync = on-close\n");
        assert!(m.contains("string values need quotes"), "{m}");
    }

    #[test]
    fn booleans_and_other_errors() {
        let m = explain("allow_overwrites = True\n");
        assert!(m.contains("true or false"), "{m}");
        // Not a quoting problem: the parser's own words stay.
        let m = explain("[[route]\n");
        assert!(!m.contains("quotes"), "{m}");
    }
}
