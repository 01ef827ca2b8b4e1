//! Path patterns (`/api/users/{id}`, `/files/{*rest}`) and the placeholders
//! of `path_rewrite`. Parsed once at validation and again at compile time.

/// One `/`-separated piece of a route path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Static(String),
    Param(String),
    CatchAll(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
}

pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PathPattern {
    pub fn parse(path: &str) -> Result<Self, String> {
        let Some(rest) = path.strip_prefix('/') else {
            return Err("a path must start with /".into());
        };
        if path.len() > 2048 {
            return Err("a path is at most 2048 characters".into());
        }
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() { vec![""] } else { rest.split('/').collect() };
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let last = i + 1 == count;
            if part.is_empty() && !last {
                return Err("a path cannot hold an empty segment (//)".into());
            }
            if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                let (catch_all, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if !is_identifier(name) {
                    return Err(format!("parameter {{{inner}}}: a name is letters, digits and _, not starting with a digit"));
                }
                if names.contains(&name) {
                    return Err(format!("parameter {{{name}}} appears twice"));
                }
                names.push(name);
                if catch_all {
                    if !last {
                        return Err(format!("{{*{name}}} must be the last segment"));
                    }
                    segments.push(Segment::CatchAll(name.to_string()));
                } else {
                    segments.push(Segment::Param(name.to_string()));
                }
            } else if part.contains(['{', '}']) {
                return Err(format!("segment {part:?}: a parameter must be a whole segment, such as /{{id}}"));
            } else if let Some(c) = part.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '\\')) {
                return Err(format!("segment {part:?}: character {c:?} is not allowed"));
            } else if part == "." || part == ".." {
                return Err("a path cannot hold . or .. segments".into());
            } else {
                segments.push(Segment::Static(part.to_string()));
            }
        }
        Ok(PathPattern { segments })
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::CatchAll(n) => Some(n.as_str()),
            Segment::Static(_) => None,
        })
    }

    /// Matches a (normalized) path on its own, without a router: the
    /// parameters' raw values, or `None`.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut rest = path.strip_prefix('/')?;
        let mut params = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let last = i + 1 == self.segments.len();
            let (part, next) = match rest.find('/') {
                Some(p) => (&rest[..p], Some(&rest[p + 1..])),
                None => (rest, None),
            };
            match seg {
                Segment::CatchAll(name) => {
                    params.push((name.clone(), rest.to_string()));
                    return Some(params);
                }
                Segment::Static(s) if s == part => {}
                Segment::Param(name) if !part.is_empty() => params.push((name.clone(), part.to_string())),
                _ => return None,
            }
            match next {
                Some(n) if !last => rest = n,
                None if last => return Some(params),
                _ => return None,
            }
        }
        None
    }

    /// The pattern with parameters renamed by position, so two routes of the
    /// same shape (`/u/{id}` and `/u/{name}`) share one router entry.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        for (i, seg) in self.segments.iter().enumerate() {
            out.push('/');
            match seg {
                Segment::Static(s) => out.push_str(s),
                Segment::Param(_) => out.push_str(&format!("{{p{i}}}")),
                Segment::CatchAll(_) => out.push_str(&format!("{{*p{i}}}")),
            }
        }
        out
    }
}

/// The pattern as written: `/users/{id}`, `/files/{*rest}`.
impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for seg in &self.segments {
            match seg {
                Segment::Static(s) => write!(f, "/{s}")?,
                Segment::Param(p) => write!(f, "/{{{p}}}")?,
                Segment::CatchAll(p) => write!(f, "/{{*{p}}}")?,
            }
        }
        Ok(())
    }
}

/// A piece of a `path_rewrite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewritePart {
    Literal(String),
    Param(String),
}

pub fn parse_rewrite(rewrite: &str, params: &[&str]) -> Result<Vec<RewritePart>, String> {
    if !rewrite.starts_with('/') {
        return Err("path_rewrite must start with /".into());
    }
    let mut parts = Vec::new();
    let mut rest = rewrite;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(RewritePart::Literal(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err("path_rewrite has a { without }".into());
        };
        let name = &rest[open + 1..open + close];
        let name = name.strip_prefix('*').unwrap_or(name);
        if !params.contains(&name) {
            return Err(format!("path_rewrite uses {{{name}}}, which the path does not define"));
        }
        parts.push(RewritePart::Param(name.to_string()));
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err("path_rewrite has a } without {".into());
    }
    if !rest.is_empty() {
        parts.push(RewritePart::Literal(rest.to_string()));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = PathPattern::parse("/api/users/{id}/files/{*rest}").unwrap();
        assert_eq!(p.shape(), "/api/users/{p2}/files/{*p4}");
        assert_eq!(p.param_names().collect::<Vec<_>>(), ["id", "rest"]);
        assert_eq!(PathPattern::parse("/").unwrap().shape(), "/");
        assert_eq!(PathPattern::parse("/a/").unwrap().shape(), "/a/");
        for bad in ["api", "/a//b", "/{*x}/b", "/a{b}", "/{a}/{a}", "/{1x}", "/a b", "/../x"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_print_as_written() {
        for path in ["/api/users/{id}/files/{*rest}", "/", "/a/", "/v1/x"] {
            assert_eq!(PathPattern::parse(path).unwrap().to_string(), path);
        }
    }

    #[test]
    fn standalone_matching() {
        let p = PathPattern::parse("/v1/users/{id}/dashboard").unwrap();
        assert_eq!(p.matches("/v1/users/42/dashboard"), Some(vec![("id".into(), "42".into())]));
        assert_eq!(p.matches("/v1/users/42"), None);
        assert_eq!(p.matches("/v1/users//dashboard"), None);
        assert_eq!(p.matches("/v1/users/42/dashboard/x"), None);
        let c = PathPattern::parse("/files/{*rest}").unwrap();
        assert_eq!(c.matches("/files/a/b"), Some(vec![("rest".into(), "a/b".into())]));
        assert_eq!(PathPattern::parse("/").unwrap().matches("/"), Some(vec![]));
    }

    #[test]
    fn rewrites() {
        let parts = parse_rewrite("/v2/{id}/x{rest}", &["id", "rest"]).unwrap();
        assert_eq!(parts.len(), 4);
        assert!(parse_rewrite("/v2/{nope}", &["id"]).is_err());
        assert!(parse_rewrite("v2", &[]).is_err());
    }
}
