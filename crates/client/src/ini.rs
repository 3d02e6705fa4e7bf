//! Section-level editing of INI-style files (`~/.pg_service.conf`, `~/.my.cnf`),
//! sans-IO: text in, text out.
//!
//! A section starts at a header line `[name]` (leading/trailing blanks allowed) and runs
//! until the next header line. Only the named section is touched: every other byte of
//! the file (foreign sections, comments, blank lines, odd spacing, the lines before the
//! first header) stays exactly as it was, in the same order.

/// The name in a header line, if `line` is one (`[name]`, blanks around it allowed;
/// a trailing `\r` is ignored). Comments (`#`, `;`) and other lines are not headers.
fn header_name(line: &str) -> Option<&str> {
    let trimmed = line.trim();
    let inner = trimmed.strip_prefix('[')?.strip_suffix(']')?;
    if inner.contains(['[', ']']) {
        return None;
    }
    Some(inner.trim())
}

/// The text split into lines, each keeping its own line ending.
fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

/// Byte ranges `(start, end)` of every section called `name`: its header through its
/// last setting. Blank lines and comments after the last setting are left outside, as
/// they usually introduce the next section.
fn section_ranges(text: &str, name: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut offset = 0;
    // (start, end of the last line that is neither blank nor a comment)
    let mut open: Option<(usize, usize)> = None;
    for line in lines(text) {
        let end = offset + line.len();
        if let Some(found) = header_name(line) {
            if let Some((start, content_end)) = open.take() {
                ranges.push((start, content_end));
            }
            if found == name {
                open = Some((offset, end));
            }
        } else if let Some((_, content_end)) = open.as_mut() {
            let trimmed = line.trim();
            if !trimmed.is_empty() && !trimmed.starts_with(['#', ';']) {
                *content_end = end;
            }
        }
        offset = end;
    }
    if let Some((start, content_end)) = open {
        ranges.push((start, content_end));
    }
    ranges
}

/// Whether a section called `name` exists.
pub fn has_section(text: &str, name: &str) -> bool {
    !section_ranges(text, name).is_empty()
}

/// The `key=value` pairs of the first section called `name`, in order.
pub fn section_values(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let &(start, end) = section_ranges(text, name).first()?;
    let body = &text[start..end];
    Some(
        lines(body)
            .into_iter()
            .skip(1)
            .filter_map(|line| {
                let line = line.trim();
                if line.starts_with(['#', ';']) {
                    return None;
                }
                let (key, value) = line.split_once('=')?;
                Some((key.trim().to_owned(), value.trim().to_owned()))
            })
            .collect(),
    )
}

/// Renders a section: header and `key=value` lines, ending with a newline.
pub fn render_section(name: &str, entries: &[(&str, String)]) -> String {
    let mut out = format!("[{name}]\n");
    for (key, value) in entries {
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
    }
    out
}

/// `text` with the section `name` replaced by `section` (a rendered section, ending in
/// a newline) where it was, or appended at the end when it did not exist. Further
/// sections of the same name (a hand-edited file) are removed, so lookups see ours.
pub fn upsert_section(text: &str, name: &str, section: &str) -> String {
    let ranges = section_ranges(text, name);
    let Some(&(first_start, _)) = ranges.first() else {
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(section);
        return out;
    };
    let mut out = String::with_capacity(text.len() + section.len());
    let mut cursor = 0;
    for &(start, end) in &ranges {
        out.push_str(&text[cursor..start]);
        if start == first_start {
            out.push_str(section);
            // Our section ends with a newline; if the old one ended the file without
            // one, there is nothing after it to separate from.
        }
        cursor = end;
    }
    out.push_str(&text[cursor..]);
    out
}

/// `text` without any section called `name`; `None` when there was none.
pub fn remove_section(text: &str, name: &str) -> Option<String> {
    let ranges = section_ranges(text, name);
    if ranges.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut cursor = 0;
    for (start, end) in ranges {
        out.push_str(&text[cursor..start]);
        cursor = end;
    }
    out.push_str(&text[cursor..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Headers are recognised with blanks around them, comments and values are not.
    #[test]
    fn recognises_headers() {
        assert_eq!(header_name("[a]\n"), Some("a"));
        assert_eq!(header_name("  [ client_x ]  \r\n"), Some("client_x"));
        assert_eq!(header_name("# [a]"), None);
        assert_eq!(header_name("a=[b]"), None);
        assert_eq!(header_name("[a]b]"), None);
    }

    // Replacing a section keeps what surrounds it, byte for byte.
    #[test]
    fn replaces_in_place() {
        let text = "# top\n[a]\nx=1\n\n[b]\ny=2\n";
        let out = upsert_section(text, "a", "[a]\nx=9\n");
        assert_eq!(out, "# top\n[a]\nx=9\n\n[b]\ny=2\n");
        let out = upsert_section(text, "c", "[c]\nz=3\n");
        assert_eq!(out, "# top\n[a]\nx=1\n\n[b]\ny=2\n[c]\nz=3\n");
        assert_eq!(remove_section(&out, "c").unwrap(), text);
        assert_eq!(remove_section(text, "zz"), None);
        assert_eq!(
            section_values(text, "b").unwrap(),
            [("y".to_owned(), "2".to_owned())]
        );
    }

    // A file without a final newline gets one before an appended section.
    #[test]
    fn appends_after_missing_newline() {
        assert_eq!(upsert_section("[a]\nx=1", "b", "[b]\n"), "[a]\nx=1\n[b]\n");
    }
}
