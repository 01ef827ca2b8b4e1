//! `correlation-id`: every request carries an id in a header (the
//! client's, when plausible, else a new UUID), passed to every backend
//! call and echoed on the answer.

use http::{HeaderName, HeaderValue};

use crate::config::CorrelationIdConfig;
use crate::policy::filter::{Compile, Filter, Invalid, Phase, RequestCx};
use crate::policy::Refusal;

#[derive(Debug)]
pub struct CorrelationId {
    header: HeaderName,
    echo: bool,
}

impl Filter for CorrelationId {
    type Config = CorrelationIdConfig;

    fn compile(c: &CorrelationIdConfig, cx: &mut Compile<'_>) -> Result<Self, Invalid> {
        let Some(header) = cx.header_name("header", &c.header) else { return Err(cx.invalid()) };
        Ok(CorrelationId { header, echo: c.echo_downstream })
    }

    fn phase(&self) -> Phase {
        Phase::CorrelationId
    }

    async fn request(&self, cx: &mut RequestCx<'_>) -> Result<(), Refusal> {
        let value = match cx.headers.get(&self.header) {
            Some(v) if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic) => v.clone(),
            _ => HeaderValue::from_str(&crate::ids::new_uuid()).expect("a uuid is a valid header value"),
        };
        cx.headers.insert(self.header.clone(), value.clone());
        cx.out.correlation = Some(self.header.clone());
        if self.echo {
            cx.out.echo = Some((self.header.clone(), value));
        }
        Ok(())
    }
}
