//! A call's answer body parsed only as far as the composition reads it.
//!
//! When the config compiles, every place that reads a call's body (a
//! template, a query, `when`, the response) is folded into one [`Need`]
//! tree per call: the fields it reads, and which of them are only ever
//! copied into the JSON response as they are. Per request the body is
//! then parsed with serde_json's own parser, but fields nothing reads are
//! only checked (no strings copied, no maps built), and a field the
//! response copies as it is becomes its serialized text straight away
//! (a [`Copies`] slot) instead of a `Value` that is built, serialized and
//! dropped again.
//!
//! What is accepted is what `serde_json::from_slice::<Value>` accepts (the
//! same parser walks every byte, with the same depth limit), and a copied
//! field's text is byte for byte what serializing its `Value` would give.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The key serde_json's `Value` takes as a raw value's marker (its
/// `raw_value` feature, on in this build): an object whose first key is
/// this one is read by `Value` as the JSON text of its string value.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// What of one value is read.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// All of it, as a `Value`.
    Whole,
    /// Only these fields, when it is an object (any other value is kept
    /// whole); the rest of it is checked and dropped.
    Fields(Vec<(String, Need)>),
    /// Only copied into the JSON response as it is: kept as its serialized
    /// text, in this slot of the call's [`Copies`].
    Copy(usize),
}

/// One call's [`Need`] for its body, and how many copy slots it has.
#[derive(Debug, PartialEq)]
pub struct Projection {
    pub need: Need,
    pub slots: usize,
}

impl Projection {
    /// Whether the body is parsed whole anyway.
    pub fn is_whole(&self) -> bool {
        self.need == Need::Whole
    }
}

/// The copied fields of one answer: each slot's serialized text in `buf`,
/// or `None` when the answer did not have that field (then the document
/// has nothing there either).
#[derive(Debug, Default)]
pub struct Copies {
    buf: Vec<u8>,
    ranges: Vec<Option<Range<usize>>>,
}

impl Copies {
    pub fn get(&self, slot: usize) -> Option<&[u8]> {
        let r = self.ranges.get(slot)?.clone()?;
        self.buf.get(r)
    }
}

/// Parses `bytes` as JSON keeping what `p` reads: the document's `Value`
/// (with only the fields read, and none of the copied ones) and the copied
/// fields' text. `None` copies when the projection has no slot.
pub fn parse(bytes: &[u8], p: &Projection) -> serde_json::Result<(Value, Option<Copies>)> {
    if p.need == Need::Whole {
        return serde_json::from_slice(bytes).map(|v| (v, None));
    }
    // Checked once here rather than string by string: a body that is not
    // UTF-8 is not JSON (`from_slice` refuses it in a string, and anywhere
    // else it is not JSON's syntax).
    let text = std::str::from_utf8(bytes).map_err(|_| de::Error::custom("the body is not UTF-8"))?;
    let mut copies = Copies { buf: Vec::new(), ranges: vec![None; p.slots] };
    let mut de = serde_json::Deserializer::from_str(text);
    let value = match &p.need {
        Need::Fields(fields) => Pick { fields, copies: &mut copies, depth: 0 }.deserialize(&mut de)?,
        // The whole body copied: nothing in the document.
        Need::Copy(slot) => {
            CopySeed { copies: &mut copies, slot: *slot, enclosed: 0 }.deserialize(&mut de)?;
            Value::Null
        }
        Need::Whole => unreachable!("parsed above"),
    };
    de.end()?;
    Ok((value, (p.slots > 0).then_some(copies)))
}

/// serde_json refuses a value nested deeper than this (its recursion limit
/// of 128, which the 128th level reaches).
const MAX_DEPTH: usize = 127;

/// Copies `raw` (a value serde_json's syntax check passed, inside
/// `enclosed` arrays and objects) into `slot`: as it is when it is already
/// what serializing its `Value` writes (compact, strings without escapes,
/// numbers in their shortest form, no repeated key: what most backends
/// send), else transcoded.
fn copy_raw(raw: &str, enclosed: usize, copies: &mut Copies, slot: usize) -> serde_json::Result<()> {
    let Scan { canonical, depth, .. } = scan(raw.as_bytes());
    if enclosed + depth > MAX_DEPTH {
        return Err(de::Error::custom("recursion limit exceeded"));
    }
    if !canonical {
        let mut de = serde_json::Deserializer::from_str(raw);
        copy_into(&mut de, copies, slot)?;
        return de.end();
    }
    let start = copies.buf.len();
    copies.buf.extend_from_slice(raw.as_bytes());
    copies.ranges[slot] = Some(start..copies.buf.len());
    Ok(())
}

/// What [`scan`] found.
#[derive(Debug)]
struct Scan {
    /// Byte for byte what serde_json writes for the `Value` it parses to.
    canonical: bool,
    /// How deep it nests (a scalar 0).
    depth: usize,
}

/// Looks through JSON text that passed serde_json's syntax check (which
/// checks neither number ranges, nor `\u` escapes, nor depth): whether it
/// is already what serializing its `Value` writes, and how deep it nests.
/// Anything unusual (whitespace, an escape or control character, a number
/// not in its shortest form, a repeated key, many keys, the raw-value
/// marker) is not canonical: it is transcoded, which checks it fully.
fn scan(b: &[u8]) -> Scan {
    let mut canonical = true;
    let (mut depth, mut max) = (0usize, 0usize);
    // The keys of the open objects, and where each open object's start
    // (`None` for an array).
    let mut keys: Vec<Range<usize>> = Vec::new();
    let mut open: Vec<Option<usize>> = Vec::new();
    let mut key_next = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            c @ (b'{' | b'[') => {
                depth += 1;
                max = max.max(depth);
                open.push((c == b'{').then_some(keys.len()));
                key_next = c == b'{';
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if let Some(Some(base)) = open.pop() {
                    keys.truncate(base);
                }
                key_next = false;
                i += 1;
            }
            b',' => {
                key_next = matches!(open.last(), Some(Some(_)));
                i += 1;
            }
            b':' => i += 1,
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'"' => break,
                        b'\\' => {
                            canonical = false;
                            i += 2;
                        }
                        c => {
                            canonical &= c >= 0x20;
                            i += 1;
                        }
                    }
                }
                i += 1;
                if let (true, Some(Some(base))) = (key_next, open.last()) {
                    let key = &b[start..i.min(b.len())];
                    let n = keys.len() - base;
                    if canonical
                        && ((n == 0 && key.get(1..key.len() - 1) == Some(RAW_VALUE_TOKEN.as_bytes()))
                            || n >= MAX_CHECKED_KEYS
                            || keys[*base..].iter().any(|r| &b[r.clone()] == key))
                    {
                        canonical = false;
                    }
                    if canonical {
                        keys.push(start..i.min(b.len()));
                    }
                }
                key_next = false;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                canonical &= shortest_number(&b[start..i]);
            }
            b't' | b'n' => i += 4,
            b'f' => i += 5,
            _ => {
                canonical = false;
                i += 1;
            }
        }
    }
    Scan { canonical, depth: max }
}

/// Whether a JSON number is written as serde_json writes what it parses it
/// to: an integer of at most 18 digits (an exact i64 or u64, written back
/// by itoa; not `-0`, a float), or a decimal without exponent of at most 15
/// digits (parsed exactly, one rounding, and then the shortest form ryu
/// writes is these digits) in ryu's plain notation: no trailing zero but
/// `.0`, and at most four zeros after `0.`.
fn shortest_number(n: &[u8]) -> bool {
    let digits = n.strip_prefix(b"-").unwrap_or(n);
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    let plain = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    if !plain(int) || (int.len() > 1 && int[0] == b'0') {
        return false;
    }
    let Some(frac) = frac else {
        return int.len() <= 18 && !(int == b"0" && digits.len() < n.len());
    };
    if !plain(frac) || (if int == b"0" { 0 } else { int.len() }) + frac.len() > 15 {
        return false;
    }
    if frac == b"0" {
        return true;
    }
    let zeros = frac.iter().take_while(|&&c| c == b'0').count();
    frac.last() != Some(&b'0') && (int != b"0" || zeros <= 4)
}

/// Transcodes the next value of `de` into `copies`' slot `slot` (what a
/// value [`scan`] did not find in its final form takes).
fn copy_into<'de, D: Deserializer<'de>>(de: D, copies: &mut Copies, slot: usize) -> Result<(), D::Error> {
    let start = copies.buf.len();
    let mut t = Transcode { out: &mut copies.buf, keys: Vec::new(), normalize: false };
    t.next(de)?;
    if t.normalize {
        // Duplicate keys, a big object, or serde_json's raw-value marker:
        // what `Value` makes of the text is what is written.
        let v: Value = serde_json::from_slice(&copies.buf[start..]).map_err(de::Error::custom)?;
        copies.buf.truncate(start);
        serde_json::to_writer(&mut copies.buf, &v).map_err(de::Error::custom)?;
    }
    copies.ranges[slot] = Some(start..copies.buf.len());
    Ok(())
}

/// A map key, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The value of a [`Need::Fields`]: an object keeps only those fields; any
/// other value is read whole, as `Value` would read it.
struct Pick<'a> {
    fields: &'a [(String, Need)],
    copies: &'a mut Copies,
    /// The arrays and objects around the value.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        de::Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut first = true;
        while let Some(Key(key)) = map.next_key()? {
            if std::mem::take(&mut first) && key == RAW_VALUE_TOKEN {
                return raw_token_value(&mut map);
            }
            match self.fields.iter().find(|(k, _)| *k == key) {
                Some((k, Need::Whole)) => {
                    out.insert(k.clone(), map.next_value()?);
                }
                Some((k, Need::Fields(fields))) => {
                    if out.contains_key(k.as_str()) {
                        // A repeated key: its last value is the whole of
                        // it, as in `Value`; copies taken from an earlier
                        // one must not outlive it.
                        clear_copies(fields, self.copies);
                    }
                    let v = map.next_value_seed(Pick { fields, copies: &mut *self.copies, depth: self.depth + 1 })?;
                    out.insert(k.clone(), v);
                }
                Some((_, Need::Copy(slot))) => {
                    map.next_value_seed(CopySeed { copies: &mut *self.copies, slot: *slot, enclosed: self.depth + 1 })?
                }
                None => map.next_value_seed(Check)?,
            }
        }
        Ok(Value::Object(out))
    }
}

/// Empties every copy slot under `fields`.
fn clear_copies(fields: &[(String, Need)], copies: &mut Copies) {
    for (_, need) in fields {
        match need {
            Need::Whole => {}
            Need::Fields(inner) => clear_copies(inner, copies),
            Need::Copy(slot) => copies.ranges[*slot] = None,
        }
    }
}

/// `{"$serde_json::private::RawValue": "text"}` as `Value` reads it: the
/// text parsed as JSON.
fn raw_token_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Value, A::Error> {
    let Key(text) = map.next_value()?;
    serde_json::from_str(&text).map_err(de::Error::custom)
}

/// A value only copied: its text, borrowed from the body (serde_json
/// checks its syntax), then [`copy_raw`].
struct CopySeed<'a> {
    copies: &'a mut Copies,
    slot: usize,
    enclosed: usize,
}

impl<'de> DeserializeSeed<'de> for CopySeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let raw = <&serde_json::value::RawValue>::deserialize(d)?;
        copy_raw(raw.get(), self.enclosed, self.copies, self.slot).map_err(de::Error::custom)
    }
}

/// A value nothing reads, parsed as `Value` would parse it (so it is
/// refused where `Value` refuses it), kept nowhere.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut first = true;
        while let Some(Key(key)) = map.next_key()? {
            if std::mem::take(&mut first) && key == RAW_VALUE_TOKEN {
                return raw_token_value(&mut map).map(drop);
            }
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// Objects with more keys than this are not checked for duplicates while
/// they are copied: their text goes through `Value` instead.
const MAX_CHECKED_KEYS: usize = 32;

/// Writes each value as serde_json writes the `Value` it parses to: the
/// same number forms (the parser's u64, i64 or f64, then itoa or ryu), the
/// same string escaping, no whitespace. What `Value` would change beyond
/// that (a repeated key: its first place, its last value) sets `normalize`.
struct Transcode<'a> {
    out: &'a mut Vec<u8>,
    /// Where each key of the objects being copied was written (a stack:
    /// each object's keys after its parents').
    keys: Vec<Range<usize>>,
    normalize: bool,
}

impl<'a> Transcode<'a> {
    fn next<'de, D: Deserializer<'de>>(&mut self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(TranscodeVisitor(self))
    }
}

struct TranscodeVisitor<'t, 'a>(&'t mut Transcode<'a>);

impl<'de> DeserializeSeed<'de> for TranscodeVisitor<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn write_json<E: de::Error, T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), E> {
    serde_json::to_writer(out, v).map_err(E::custom)
}

impl<'de> Visitor<'de> for TranscodeVisitor<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        write_json(self.0.out, &v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        write_json(self.0.out, &v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // As `Value` holds it: a non-finite number is null.
        match serde_json::Number::from_f64(v) {
            Some(n) => write_json(self.0.out, &n),
            None => {
                self.0.out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        write_json(self.0.out, v)
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.out.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let t = self.0;
        t.out.push(b'[');
        let mut first = true;
        loop {
            if !first {
                t.out.push(b',');
            }
            if seq.next_element_seed(TranscodeVisitor(&mut *t))?.is_none() {
                if !first {
                    t.out.pop();
                }
                break;
            }
            first = false;
        }
        t.out.push(b']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let t = self.0;
        t.out.push(b'{');
        let base = t.keys.len();
        while let Some(Key(key)) = map.next_key()? {
            let n = t.keys.len() - base;
            if n > 0 {
                t.out.push(b',');
            }
            let start = t.out.len();
            write_json(t.out, &*key)?;
            let written = start..t.out.len();
            if !t.normalize
                && ((n == 0 && key == RAW_VALUE_TOKEN)
                    || n >= MAX_CHECKED_KEYS
                    || t.keys[base..].iter().any(|r| t.out[r.clone()] == t.out[written.clone()]))
            {
                t.normalize = true;
            }
            t.keys.push(written);
            t.out.push(b':');
            map.next_value_seed(TranscodeVisitor(&mut *t))?;
        }
        t.keys.truncate(base);
        t.out.push(b'}');
        Ok(())
    }
}

/// One step of a path that reads the document: a name, or anything else
/// (an index, a wildcard, a filter), past which the value is read whole.
#[derive(Clone, Copy, Debug)]
pub enum Step<'a> {
    Name(&'a str),
    Other,
}

/// A [`Need`] being built: `Unread` until a read reaches it.
#[derive(Debug)]
enum Node {
    Unread,
    Fields(Vec<(String, Node)>),
    Copy,
    Whole,
}

impl Node {
    /// Adds a read of `path` below this node: of its value (`verbatim`
    /// false), or only to copy it into the JSON response. A value both
    /// copied and read by a sub-path, or read as a value, is read whole.
    fn add(&mut self, path: &[&str], verbatim: bool) {
        let Some((head, rest)) = path.split_first() else {
            *self = match self {
                Node::Unread | Node::Copy if verbatim => Node::Copy,
                _ => Node::Whole,
            };
            return;
        };
        let fields = match self {
            Node::Whole => return,
            Node::Copy => {
                *self = Node::Whole;
                return;
            }
            Node::Unread => {
                *self = Node::Fields(Vec::new());
                let Node::Fields(f) = self else { unreachable!() };
                f
            }
            Node::Fields(f) => f,
        };
        let child = match fields.iter().position(|(k, _)| k == head) {
            Some(i) => &mut fields[i].1,
            None => {
                fields.push((head.to_string(), Node::Unread));
                &mut fields.last_mut().expect("just pushed").1
            }
        };
        child.add(rest, verbatim);
    }

    fn finish(self, slots: &mut usize) -> Need {
        match self {
            Node::Unread => Need::Fields(Vec::new()),
            Node::Fields(f) => Need::Fields(f.into_iter().map(|(k, n)| (k, n.finish(slots))).collect()),
            Node::Copy => {
                *slots += 1;
                Need::Copy(*slots - 1)
            }
            Node::Whole => Need::Whole,
        }
    }
}

/// Collects, when a composition compiles, what each call's body is read
/// for. Calls whose requests may be shared within one request (the same
/// GET to the same origin) share one projection: one's answer can be the
/// other's.
pub struct Reads<'n> {
    names: &'n [&'n str],
    /// The call whose tree each call's reads go into.
    group: Vec<usize>,
    trees: Vec<Node>,
    /// Each call's entry fields besides `body` that something reads.
    fields: Vec<EntryFields>,
}

/// Which of a call's entry fields besides `body` (always there) something
/// reads: only those are put in the document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryFields(pub u8);

impl EntryFields {
    pub const STATUS: u8 = 1;
    pub const HEADERS: u8 = 2;
    pub const ERROR: u8 = 4;
    pub const DURATION: u8 = 8;
    pub const ALL: EntryFields = EntryFields(15);

    pub fn has(self, field: u8) -> bool {
        self.0 & field != 0
    }

    fn of(name: &str) -> u8 {
        match name {
            "status" => Self::STATUS,
            "headers" => Self::HEADERS,
            "error" => Self::ERROR,
            "duration_ms" => Self::DURATION,
            _ => 0,
        }
    }
}

impl<'n> Reads<'n> {
    pub fn new(names: &'n [&'n str], group: Vec<usize>) -> Self {
        Reads { names, trees: names.iter().map(|_| Node::Unread).collect(), fields: vec![EntryFields::default(); names.len()], group }
    }

    /// Call `i`'s body is read whole.
    pub fn whole(&mut self, i: usize) {
        self.trees[self.group[i]] = Node::Whole;
    }

    /// Every call's entry is read whole (the default response, `$`, a
    /// wildcard over the calls).
    pub fn everything(&mut self) {
        for i in 0..self.trees.len() {
            self.whole(i);
            self.fields[i] = EntryFields::ALL;
        }
    }

    /// The entry fields besides `body` something reads of call `i`.
    pub fn fields(&self, i: usize) -> EntryFields {
        self.fields[i]
    }

    /// A read of the document along `steps` (from its root): of the value
    /// there, or (`verbatim`) only to copy it into the JSON response.
    pub fn path<'a>(&mut self, steps: impl IntoIterator<Item = Step<'a>>, verbatim: bool) {
        let mut steps = steps.into_iter();
        let root = match steps.next() {
            None => return self.everything(),
            Some(Step::Name(root)) => root,
            // An index on the document (an object) reads nothing.
            Some(Step::Other) => return,
        };
        // `request`, `item`, `items`: not a call.
        let Some(i) = self.names.iter().position(|n| *n == root) else { return };
        match steps.next() {
            // The whole entry, or any of its fields (`$.a.*`, `$.a..x`).
            None | Some(Step::Other) => {
                self.fields[i] = EntryFields::ALL;
                return self.whole(i);
            }
            Some(Step::Name("body")) => {}
            // `status`, `headers`, `error`, `duration_ms`: not the body.
            Some(Step::Name(field)) => {
                self.fields[i].0 |= EntryFields::of(field);
                return;
            }
        }
        let mut names = Vec::new();
        let mut verbatim = verbatim;
        for step in steps {
            match step {
                Step::Name(n) => names.push(n),
                Step::Other => {
                    verbatim = false;
                    break;
                }
            }
        }
        self.trees[self.group[i]].add(&names, verbatim);
    }

    /// Each call's projection.
    pub fn finish(self) -> Vec<std::sync::Arc<Projection>> {
        let group = self.group;
        let done: Vec<Option<std::sync::Arc<Projection>>> = (self.trees.into_iter().enumerate())
            .map(|(i, tree)| {
                (group[i] == i).then(|| {
                    let mut slots = 0;
                    let need = tree.finish(&mut slots);
                    std::sync::Arc::new(Projection { need, slots })
                })
            })
            .collect();
        group.iter().map(|&g| done[g].clone().expect("a group's first call holds its tree")).collect()
    }
}

impl Projection {
    /// The copy slot a verbatim read along `names` (below the body) ended
    /// in, if it did.
    pub fn slot(&self, names: &[&str]) -> Option<usize> {
        let mut need = &self.need;
        for name in names {
            let Need::Fields(fields) = need else { return None };
            need = &fields.iter().find(|(k, _)| k == name)?.1;
        }
        match need {
            Need::Copy(slot) => Some(*slot),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_of(text: &str) -> Result<Vec<u8>, String> {
        let p = Projection { need: Need::Copy(0), slots: 1 };
        let (_, copies) = parse(text.as_bytes(), &p).map_err(|e| e.to_string())?;
        Ok(copies.unwrap().get(0).unwrap().to_vec())
    }

    fn via_value(text: &str) -> Result<Vec<u8>, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn copies_are_what_value_would_write() {
        for text in [
            r#"[{"id":"o-1","total":42.5,"n":12.0,"ok":true,"x":null}]"#,
            " [ 1 , -2 , 3.0e2 , 1E-7 , -0 , 0.1 , 18446744073709551615 , -9223372036854775808 , 18446744073709551616 ] ",
            r#"{"s":"a\"b\\c\/d\n\t\u0001\u00e9\ud83d\ude00 é 😀","empty":"","k\u0065y":1}"#,
            r#"{"a":1,"b":{"c":[[],{}],"d":[{"e":[1,2,{"f":"g"}]}]}}"#,
            r#"{"dup":1,"x":2,"dup":3}"#,
            r#"{"o":{"dup":1,"dup":{"in":[1,2]}},"dup":[]}"#,
            r#"{"$serde_json::private::RawValue":"[1, 2,3]"}"#,
            "12345678901234567890123456789",
            "1.7976931348623157e308",
            "\"\\u2028\\u2029\"",
        ] {
            assert_eq!(copy_of(text), via_value(text), "{text}");
        }
        let many: String = format!("{{{}}}", (0..100).map(|i| format!("\"k{}\":{i}", i % 60)).collect::<Vec<_>>().join(","));
        assert_eq!(copy_of(&many), via_value(&many));
    }

    #[test]
    fn numbers_in_their_shortest_form_are_kept_as_they_are() {
        for n in [
            "0",
            "7",
            "-7",
            "42.5",
            "12.0",
            "-0.0",
            "0.0",
            "100.0",
            "0.5",
            "0.00001",
            "123456789012345",
            "999999999999999999",
            "-999999999999999999",
            "1.25",
            "0.123456789012345",
        ] {
            assert!(shortest_number(n.as_bytes()), "{n}");
            assert_eq!(via_value(n).unwrap(), n.as_bytes(), "{n}");
        }
        for n in
            ["-0", "1.50", "1.00", "0.000001", "1e2", "1E2", "1.5e3", "1234567890123456789", "1.2345678901234567", "0.1234567890123456"]
        {
            assert!(!shortest_number(n.as_bytes()), "{n}");
        }
        let s = scan(br#"{"a":[1,{"b":"x","c":[]}],"d":null,"e":true,"f":false}"#);
        assert!(s.canonical, "{s:?}");
        assert_eq!(s.depth, 4);
        for text in [
            r#"{"a":1,"a":2}"#,
            r#"[1, 2]"#,
            "[1.50]",
            r#"{"b":0,"a":1,"a":2}"#,
            r#"["\n"]"#,
            r#"{"$serde_json::private::RawValue":"1"}"#,
            "[1e400]",
            r#"["a\ud800"]"#,
        ] {
            assert!(!scan(text.as_bytes()).canonical, "{text}");
        }
        // A key may come again in another object.
        assert!(scan(br#"[{"a":1},{"a":2,"b":{"a":3}}]"#).canonical);
    }

    #[test]
    fn refused_where_value_refuses() {
        let p = Projection { need: Need::Fields(vec![("a".into(), Need::Copy(0)), ("b".into(), Need::Whole)]), slots: 1 };
        let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for text in [
            r#"{"a":1e400}"#.to_string(),
            r#"{"z":1e400}"#.to_string(),
            r#"{"z":"\ud800"}"#.to_string(),
            r#"{"a":"\ud800"}"#.to_string(),
            r#"{"a":1,}"#.to_string(),
            r#"{"a":1} x"#.to_string(),
            r#"{"z":[1 2]}"#.to_string(),
            format!(r#"{{"z":{nested}}}"#),
            format!(r#"{{"a":{nested}}}"#),
            format!(r#"{{"a":{}1{}}}"#, "[".repeat(127), "]".repeat(127)),
            r#"{"z":{"$serde_json::private::RawValue":"[1,"}}"#.to_string(),
        ] {
            assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
            assert!(parse(text.as_bytes(), &p).is_err(), "{text}");
        }
        let bad_utf8 = b"{\"z\":\"\xff\"}";
        assert!(serde_json::from_slice::<Value>(bad_utf8).is_err());
        assert!(parse(bad_utf8, &p).is_err());
    }

    #[test]
    fn only_what_is_read_is_kept() {
        let p = Projection {
            need: Need::Fields(vec![
                ("id".into(), Need::Whole),
                ("items".into(), Need::Copy(0)),
                ("user".into(), Need::Fields(vec![("name".into(), Need::Whole), ("tags".into(), Need::Copy(1))])),
                ("gone".into(), Need::Copy(2)),
            ]),
            slots: 3,
        };
        let text = r#"{"id":7,"skip":{"deep":[1,"x"]},"items":[ {"a" : 1.50} ],"user":{"name":"Ada","tags":["x","y"],"other":1},"id":8}"#;
        let (v, copies) = parse(text.as_bytes(), &p).unwrap();
        assert_eq!(v, serde_json::json!({"id": 8, "user": {"name": "Ada"}}));
        let copies = copies.unwrap();
        assert_eq!(copies.get(0), Some(&br#"[{"a":1.5}]"#[..]));
        assert_eq!(copies.get(1), Some(&br#"["x","y"]"#[..]));
        assert_eq!(copies.get(2), None);
        // Not an object where fields are read: kept whole.
        let (v, copies) = parse(br#"[{"id":1}]"#, &p).unwrap();
        assert_eq!(v, serde_json::json!([{"id": 1}]));
        assert_eq!(copies.unwrap().get(0), None);
        let (v, _) = parse(br#"{"user":"Ada"}"#, &p).unwrap();
        assert_eq!(v, serde_json::json!({"user": "Ada"}));
    }
}
