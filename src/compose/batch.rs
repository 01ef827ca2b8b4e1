//! How a `for_each` call's items become requests and their answers items
//! again: items that render the same request share it, and a `batch`
//! call's distinct values are grouped into batches whose answers are
//! matched back to the items.

use serde_json::Value;

use super::call::{prepare, Failure, Prepared};
use super::exec::Exchange;
use super::plan::{BatchPlan, CallPlan};
use super::query::Query;
use super::template::value_text;
/// Item k gets `bodies[of[k]]`: moved out at its last use, copied before.
pub(super) fn hand_out(bodies: &mut [Option<Value>], of: &[usize], mut left: Vec<usize>) -> Vec<Value> {
    of.iter()
        .map(|&d| {
            left[d] -= 1;
            if left[d] == 0 {
                bodies[d].take().unwrap_or(Value::Null)
            } else {
                bodies[d].clone().unwrap_or(Value::Null)
            }
        })
        .collect()
}

/// A batch call's items: its distinct values (as sent, in text) grouped
/// into requests, and for each item the index of its value.
#[derive(Clone)]
pub(super) struct BatchItems {
    plan: std::sync::Arc<BatchPlan>,
    /// The text of each distinct value, in first-seen order.
    texts: Vec<String>,
    pub(super) of: Vec<usize>,
}

/// Each distinct value's element among the batches' answers, found by
/// `key` (compared as text, as the value was sent), then handed to the
/// items in item order; a value no element matched is null.
pub(super) fn match_batches(batch: &BatchItems, answers: Vec<Value>, of: &[usize]) -> Result<Vec<Value>, Failure> {
    let (shape, texts) = (&*batch.plan, &batch.texts);
    let index: std::collections::HashMap<&str, usize> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut found: Vec<Option<Value>> = vec![None; texts.len()];
    for answer in answers {
        let array = match &shape.path {
            Some(q) => q.eval(&answer),
            None => answer,
        };
        let Value::Array(elements) = array else {
            return Err(Failure::new("invalid_batch", "the batch answer is not a JSON array"));
        };
        for element in elements {
            let k = shape.key.eval(&element);
            if let Some(&d) = index.get(&*value_text(&k)) {
                if found[d].is_none() && !k.is_null() {
                    found[d] = Some(element);
                }
            }
        }
    }
    let mut uses = vec![0usize; texts.len()];
    for &d in of {
        uses[d] += 1;
    }
    Ok(hand_out(&mut found, of, uses))
}

/// The distinct requests of a `for_each` call, in first-seen order, and for
/// each item the index of its request among them: two items whose values
/// render the same request (path and query, headers, body) share one.
pub(super) fn distinct(requests: Vec<Prepared>) -> (Vec<Prepared>, Vec<usize>) {
    let mut out: Vec<Prepared> = Vec::with_capacity(requests.len());
    let mut of = Vec::with_capacity(requests.len());
    for p in requests {
        match out.iter().position(|q| q.same_request(&p)) {
            Some(d) => of.push(d),
            None => {
                of.push(out.len());
                out.push(p);
            }
        }
    }
    (out, of)
}

/// The requests of a `for_each` call (`q`, its query): one per item,
/// or, for a `batch` call, one per batch of its distinct values.
pub(super) fn prepare_for_each(
    call: &CallPlan,
    q: &Query,
    doc: &mut Value,
    ex: &Exchange,
) -> Result<(Vec<Prepared>, Option<BatchItems>), Failure> {
    let items = q.items(doc);
    if items.len() > call.max_items {
        return Err(Failure::new("too_many_items", format!("for_each gave {} items, more than {}", items.len(), call.max_items)));
    }
    if let Some(b) = &call.batch {
        // Values that are sent the same (as text) are one value.
        let mut texts: Vec<String> = Vec::new();
        let mut index = std::collections::HashMap::with_capacity(items.len());
        let mut values = Vec::new();
        let mut of = Vec::with_capacity(items.len());
        for item in items {
            let text = value_text(&item).into_owned();
            let d = *index.entry(text.clone()).or_insert_with(|| {
                texts.push(text);
                values.push(item);
                values.len() - 1
            });
            of.push(d);
        }
        let batch = BatchItems { plan: b.clone(), texts, of };
        let chunks = values.chunks(b.size).map(|chunk| Value::Array(chunk.to_vec()));
        // `of` indexes values; a batch's answers are matched to values.
        return prepare_each(call, doc, ex, "items", chunks).map(|out| (out, Some(batch)));
    }
    prepare_each(call, doc, ex, "item", items.into_iter()).map(|out| (out, None))
}

/// One request of `call` per value, each rendered with the value under
/// `name` in the document (`item`, or a batch's `items`); the name is
/// taken out again whatever happens.
fn prepare_each(
    call: &CallPlan,
    doc: &mut Value,
    ex: &Exchange,
    name: &str,
    values: impl Iterator<Item = Value>,
) -> Result<Vec<Prepared>, Failure> {
    let mut out = Vec::with_capacity(values.size_hint().0);
    let mut result = Ok(());
    for value in values {
        if let Value::Object(m) = doc {
            m.insert(name.into(), value);
        }
        match prepare(call, doc, ex) {
            Ok(p) => out.push(p),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Value::Object(m) = doc {
        m.remove(name);
    }
    result.map(|()| out)
}
