//! The `cors` policy: preflights answered by the gateway itself (before
//! authentication, since browsers send them without credentials), and the
//! `Access-Control-*` headers on actual answers.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method};

use crate::config::CorsConfig;

/// Methods allowed when the policy lists none.
const DEFAULT_METHODS: &str = "GET, HEAD, PUT, PATCH, POST, DELETE";

#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: HeaderValue,
    /// `None`: the request's own `Access-Control-Request-Headers` are allowed.
    headers: Option<HeaderValue>,
    exposed: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(ORIGIN) && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

fn join(list: &[String]) -> Option<HeaderValue> {
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(", ")).ok()
}

impl Cors {
    pub fn new(c: &CorsConfig) -> Cors {
        let upper: Vec<String> = c.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        Cors {
            any_origin: c.origins.iter().any(|o| o == "*"),
            origins: c.origins.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
            methods: join(&upper).unwrap_or(HeaderValue::from_static(DEFAULT_METHODS)),
            headers: join(&c.headers),
            exposed: join(&c.exposed_headers),
            credentials: c.credentials,
            max_age: HeaderValue::from(c.max_age.0.as_secs()),
        }
    }

    /// The value of `Access-Control-Allow-Origin` for this request's
    /// Origin, or `None` when the origin is not allowed.
    fn allow_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(ORIGIN)?;
        let text = origin.to_str().ok()?.to_ascii_lowercase();
        if self.any_origin && !self.credentials {
            return Some(HeaderValue::from_static("*"));
        }
        // With credentials, browsers refuse `*`: the origin is echoed.
        (self.any_origin || self.origins.contains(&text)).then(|| origin.clone())
    }

    /// The answer to a preflight: its headers, or `None` when the origin or
    /// method is not allowed.
    pub fn preflight(&self, headers: &HeaderMap) -> Option<HeaderMap> {
        let origin = self.allow_origin(headers)?;
        let method = headers.get(ACCESS_CONTROL_REQUEST_METHOD)?.to_str().ok()?.trim().to_ascii_uppercase();
        let methods = self.methods.to_str().unwrap_or("");
        if !methods.split(',').any(|m| m.trim() == method) {
            return None;
        }
        let mut out = HeaderMap::new();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        out.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        let allow_headers = match &self.headers {
            Some(h) => Some(h.clone()),
            None => headers.get(ACCESS_CONTROL_REQUEST_HEADERS).cloned(),
        };
        if let Some(h) = allow_headers {
            out.insert(ACCESS_CONTROL_ALLOW_HEADERS, h);
        }
        out.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.credentials {
            out.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        out.insert(VARY, HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"));
        Some(out)
    }

    /// Headers for an actual (non-preflight) answer: `Vary: Origin`, and
    /// the `Access-Control-*` ones for an allowed Origin.
    pub fn actual(&self, headers: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        // The answer depends on Origin, whether this request had one or not.
        out.insert(VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = self.allow_origin(headers) else { return out };
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if let Some(e) = &self.exposed {
            out.insert(ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
        if self.credentials {
            out.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        out
    }
}
