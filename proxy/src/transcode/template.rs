//! `google.api.http` path templates (google/api/http.proto): parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `**` may only be the last segment (as the spec requires), which keeps matching a single
//! left-to-right pass with no backtracking.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    /// One non-empty segment.
    Star,
    /// Zero or more segments, always last.
    DoubleStar,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    field_path: Vec<String>,
    /// The segments it covers, `start..end`.
    start: usize,
    end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segs: Vec<Seg>,
    vars: Vec<Variable>,
    verb: Option<String>,
}

/// A variable's field path and the (percent-decoded) text it captured.
pub type Capture<'a> = (&'a [String], String);

impl PathTemplate {
    pub fn parse(s: &str) -> Result<PathTemplate, String> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
            segs: Vec::new(),
            vars: Vec::new(),
        };
        if !p.eat(b'/') {
            return Err("must start with '/'".into());
        }
        p.segments(false)?;
        let verb = if p.eat(b':') {
            let v = p.literal()?;
            Some(v)
        } else {
            None
        };
        if p.i != p.s.len() {
            return Err(format!("unexpected {:?} at offset {}", p.s[p.i] as char, p.i));
        }
        if let Some(pos) = p.segs.iter().position(|s| *s == Seg::DoubleStar) {
            if pos + 1 != p.segs.len() {
                return Err("'**' must be the last segment".into());
            }
        }
        Ok(PathTemplate {
            segs: p.segs,
            vars: p.vars,
            verb,
        })
    }

    /// The field paths of the variables, for checking them against the request message.
    pub fn field_paths(&self) -> impl Iterator<Item = &[String]> {
        self.vars.iter().map(|v| v.field_path.as_slice())
    }

    /// How specific the template is: when several bindings match, the one with more literal
    /// segments wins (`/v1/shelves/special` over `/v1/shelves/{id}`).
    pub fn literals(&self) -> usize {
        self.segs.iter().filter(|s| matches!(s, Seg::Literal(_))).count() + usize::from(self.verb.is_some())
    }

    /// Matches a request path (without the query); returns each variable's captured value.
    pub fn matches(&self, path: &str) -> Option<Vec<Capture<'_>>> {
        let mut path = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            path = path.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        let parts: Vec<&str> = path.split('/').collect();
        let double = self.segs.last() == Some(&Seg::DoubleStar);
        let fixed = if double { self.segs.len() - 1 } else { self.segs.len() };
        if parts.len() < fixed || (!double && parts.len() != fixed) {
            return None;
        }
        for (seg, part) in self.segs.iter().zip(&parts) {
            match seg {
                Seg::Literal(l) if l != part => return None,
                Seg::Star if part.is_empty() => return None,
                _ => {}
            }
        }
        // `**` matching zero segments also swallows the empty remainder of "/v1/".
        if double && parts[fixed..] == [""] && fixed > 0 {
            return None;
        }
        let captures = self
            .vars
            .iter()
            .map(|v| {
                let end = if double && v.end == self.segs.len() {
                    parts.len()
                } else {
                    v.end
                };
                let value = if end - v.start == 1 && self.segs[v.start] == Seg::Star {
                    // A single-segment variable is fully decoded, `%2F` included.
                    percent_decode(parts[v.start], false, false)
                } else {
                    // A multi-segment one keeps reserved `%2F` as written (RFC 6570 reserved
                    // expansion, as the spec says), so segment boundaries stay visible.
                    parts[v.start..end]
                        .iter()
                        .map(|p| percent_decode(p, false, true))
                        .collect::<Vec<_>>()
                        .join("/")
                };
                (v.field_path.as_slice(), value)
            })
            .collect();
        Some(captures)
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    segs: Vec<Seg>,
    vars: Vec<Variable>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn segments(&mut self, in_var: bool) -> Result<(), String> {
        loop {
            self.segment(in_var)?;
            if !self.eat(b'/') {
                return Ok(());
            }
        }
    }

    fn segment(&mut self, in_var: bool) -> Result<(), String> {
        match self.peek() {
            Some(b'*') => {
                self.i += 1;
                if self.eat(b'*') {
                    self.segs.push(Seg::DoubleStar);
                } else {
                    self.segs.push(Seg::Star);
                }
            }
            Some(b'{') => {
                if in_var {
                    return Err("variables cannot be nested".into());
                }
                self.i += 1;
                let field_path = self.field_path()?;
                let start = self.segs.len();
                if self.eat(b'=') {
                    self.segments(true)?;
                } else {
                    self.segs.push(Seg::Star);
                }
                if !self.eat(b'}') {
                    return Err(format!("unclosed variable {{{}", field_path.join(".")));
                }
                self.vars.push(Variable {
                    field_path,
                    start,
                    end: self.segs.len(),
                });
            }
            _ => {
                let l = self.literal()?;
                self.segs.push(Seg::Literal(l));
            }
        }
        Ok(())
    }

    fn literal(&mut self) -> Result<String, String> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if matches!(c, b'/' | b':' | b'{' | b'}' | b'*' | b'=') || !c.is_ascii_graphic() {
                break;
            }
            self.i += 1;
        }
        if self.i == start {
            return Err(match self.peek() {
                Some(c) => format!("expected a segment at offset {start}, found {:?}", c as char),
                None => format!("expected a segment at offset {start}"),
            });
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn field_path(&mut self) -> Result<Vec<String>, String> {
        let mut path = Vec::new();
        loop {
            let start = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.i += 1;
            }
            if self.i == start {
                return Err(format!("expected a field name at offset {start}"));
            }
            path.push(String::from_utf8_lossy(&self.s[start..self.i]).into_owned());
            if !self.eat(b'.') {
                return Ok(path);
            }
        }
    }
}

/// Percent-decodes `s` (invalid escapes are kept as written). `plus_space` turns `+` into a
/// space (query strings); `keep_slash` leaves `%2F` encoded.
pub fn percent_decode(s: &str, plus_space: bool, keep_slash: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b'/') if keep_slash => {
                        out.extend_from_slice(&b[i..i + 3]);
                        i += 3;
                    }
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = PathTemplate::parse(t).unwrap();
        t.matches(path)
            .map(|c| c.into_iter().map(|(f, v)| (f.join("."), v)).collect())
    }

    fn one(f: &str, v: &str) -> Option<Vec<(String, String)>> {
        Some(vec![(f.to_string(), v.to_string())])
    }

    #[test]
    fn simple_variables_and_literals() {
        assert_eq!(caps("/v1/shelves/{shelf}", "/v1/shelves/7"), one("shelf", "7"));
        assert_eq!(caps("/v1/shelves/{shelf}", "/v1/shelves/"), None);
        assert_eq!(caps("/v1/shelves/{shelf}", "/v1/shelves/7/books"), None);
        assert_eq!(caps("/v1/shelves/{shelf}", "/v2/shelves/7"), None);
        assert_eq!(caps("/v1/shelves", "/v1/shelves"), Some(vec![]));
        assert_eq!(
            caps("/v1/shelves/{shelf}/books/{book.id}", "/v1/shelves/1/books/2"),
            Some(vec![("shelf".into(), "1".into()), ("book.id".into(), "2".into())])
        );
    }

    #[test]
    fn variables_with_segments() {
        let t = "/v1/{name=shelves/*/books/*}";
        assert_eq!(caps(t, "/v1/shelves/1/books/2"), one("name", "shelves/1/books/2"));
        assert_eq!(caps(t, "/v1/shelves/1/books"), None);
        assert_eq!(caps(t, "/v1/shelves/1/notes/2"), None);
        assert_eq!(caps("/v1/{name=**}", "/v1/a/b/c"), one("name", "a/b/c"));
        assert_eq!(caps("/v1/{name=files/**}", "/v1/files/a/b"), one("name", "files/a/b"));
        assert_eq!(caps("/v1/{name=files/**}", "/v1/files"), one("name", "files"));
        assert_eq!(caps("/v1/**", "/v1/"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(caps("/v1/books/{id}", "/v1/books/a%20b%2Fc"), one("id", "a b/c"));
        // Reserved expansion keeps %2F inside multi-segment variables.
        assert_eq!(caps("/v1/{name=**}", "/v1/a%2Fb/c%20d"), one("name", "a%2Fb/c d"));
        assert_eq!(percent_decode("a+b%zz%4", true, false), "a b%zz%4");
    }

    #[test]
    fn verbs() {
        let t = "/v1/{name=shelves/*}:archive";
        assert_eq!(caps(t, "/v1/shelves/3:archive"), one("name", "shelves/3"));
        assert_eq!(caps(t, "/v1/shelves/3"), None);
        assert_eq!(caps(t, "/v1/shelves/3:restore"), None);
        assert_eq!(
            caps(
                "/v1/shelves/{shelf}/books:batchCreate",
                "/v1/shelves/2/books:batchCreate"
            ),
            one("shelf", "2")
        );
        assert_eq!(PathTemplate::parse(t).unwrap().literals(), 3);
    }

    #[test]
    fn invalid_templates() {
        for (t, why) in [
            ("v1/books", "start with '/'"),
            ("/v1/{id", "unclosed"),
            ("/v1/{a={b}}", "nested"),
            ("/v1/**/x", "last segment"),
            ("/v1//x", "expected a segment"),
            ("/v1/{}", "field name"),
            ("/v1/x:", "expected a segment"),
            ("/v1/x}", "unexpected"),
        ] {
            let e = PathTemplate::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }
}
