//! The ledger's own compact binary encoding: commands in log entries and state snapshots.
//!
//! Owns the byte layout (little-endian fixed-width integers, length-prefixed strings, one tag byte per enum) and
//! the reconstruction of a [`RecordId`] from its text. Deterministic by construction: the same value always encodes
//! to the same bytes, so two replicas that applied the same log produce byte-identical snapshots. It knows nothing
//! about raft, storage or what a command means; [`state`](crate::state) decides that.

use kiln_core::billing::{Quantity, RecordId, ServerlessPhase, Subject, UsageKind, UsageRecord};
use kiln_core::money::Money;

use crate::{LedgerError, Result};

/// Appends values to a byte buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i128(&mut self, v: i128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub(crate) fn record(&mut self, r: &UsageRecord) {
        self.str(r.id.as_str());
        self.str(&r.namespace);
        match &r.subject {
            Subject::Deployment(n) => {
                self.u8(0);
                self.str(n)
            }
            Subject::Rental(n) => {
                self.u8(1);
                self.str(n)
            }
        }
        self.u8(kind_tag(r.kind));
        self.str(&r.gpu_model);
        match r.quantity {
            Quantity::MicroGpuSeconds(q) => {
                self.u8(0);
                self.i64(q)
            }
            Quantity::GpuHours(q) => {
                self.u8(1);
                self.i64(q)
            }
        }
        self.i128(r.amount.nanos());
        self.i64(r.start_ms);
        self.i64(r.end_ms);
    }
}

/// Reads values written by [`Writer`]; every read fails cleanly on truncated or malformed input.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> LedgerError {
        LedgerError::Decode { what: self.what, reason: reason.into() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.err(format!("truncated: wanted {n} bytes, {} left", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| self.err("u64"))?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        let b = self.take(8)?;
        Ok(i64::from_le_bytes(b.try_into().map_err(|_| self.err("i64"))?))
    }
    pub(crate) fn i128(&mut self) -> Result<i128> {
        let b = self.take(16)?;
        Ok(i128::from_le_bytes(b.try_into().map_err(|_| self.err("i128"))?))
    }
    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.err("length overflows usize"))?;
        Ok(self.take(n)?.to_vec())
    }
    pub(crate) fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b).map_err(|_| self.err("string is not UTF-8"))
    }

    pub(crate) fn record(&mut self) -> Result<UsageRecord> {
        let id_text = self.string()?;
        let namespace = self.string()?;
        let subject = match self.u8()? {
            0 => Subject::Deployment(self.string()?),
            1 => Subject::Rental(self.string()?),
            t => return Err(self.err(format!("unknown subject tag {t}"))),
        };
        let kind = kind_from_tag(self.u8()?).ok_or_else(|| self.err("unknown usage kind tag"))?;
        let gpu_model = self.string()?;
        let quantity = match self.u8()? {
            0 => Quantity::MicroGpuSeconds(self.i64()?),
            1 => Quantity::GpuHours(self.i64()?),
            t => return Err(self.err(format!("unknown quantity tag {t}"))),
        };
        let amount = Money::from_nanos(self.i128()?);
        let start_ms = self.i64()?;
        let end_ms = self.i64()?;
        let id = parse_record_id(&id_text).ok_or_else(|| self.err(format!("malformed record id {id_text:?}")))?;
        Ok(UsageRecord { id, namespace, subject, kind, gpu_model, quantity, amount, start_ms, end_ms })
    }
}

fn kind_tag(kind: UsageKind) -> u8 {
    match kind {
        UsageKind::Serverless(ServerlessPhase::Loading) => 0,
        UsageKind::Serverless(ServerlessPhase::Busy) => 1,
        UsageKind::Serverless(ServerlessPhase::IdleWarm) => 2,
        UsageKind::RentalHours => 3,
        UsageKind::Lent => 4,
        UsageKind::Credit => 5,
    }
}

fn kind_from_tag(tag: u8) -> Option<UsageKind> {
    Some(match tag {
        0 => UsageKind::Serverless(ServerlessPhase::Loading),
        1 => UsageKind::Serverless(ServerlessPhase::Busy),
        2 => UsageKind::Serverless(ServerlessPhase::IdleWarm),
        3 => UsageKind::RentalHours,
        4 => UsageKind::Lent,
        5 => UsageKind::Credit,
        _ => return None,
    })
}

const KINDS: [UsageKind; 6] = [
    UsageKind::Serverless(ServerlessPhase::Loading),
    UsageKind::Serverless(ServerlessPhase::Busy),
    UsageKind::Serverless(ServerlessPhase::IdleWarm),
    UsageKind::RentalHours,
    UsageKind::Lent,
    UsageKind::Credit,
];

/// Undoes the core's field escaping (`%25` → `%`, `%7C` → `|`), scanning left to right.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos..pos + 3)?;
        match code {
            "%25" => out.push('%'),
            "%7C" => out.push('|'),
            _ => return None,
        }
        rest = &rest[pos + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Rebuilds a [`RecordId`] from its text (`RecordId` has no public constructor from a string): the text is split
/// into the fields the core's id scheme joins, and the id is made again with [`RecordId::new`]; `None` unless the
/// result spells exactly the same text.
pub(crate) fn parse_record_id(text: &str) -> Option<RecordId> {
    let parts: Vec<&str> = text.split('|').collect();
    let [source, namespace, subject, kind, gpu_model, start, end] = parts.as_slice() else {
        return None;
    };
    let (subject_kind, subject_name) = subject.split_once('/')?;
    let subject_name = unescape(subject_name)?;
    let subject = match subject_kind {
        "deployment" => Subject::Deployment(subject_name),
        "rental" => Subject::Rental(subject_name),
        _ => return None,
    };
    let kind = KINDS.into_iter().find(|k| k.as_str() == *kind)?;
    let id = RecordId::new(
        &unescape(source)?,
        &unescape(namespace)?,
        &subject,
        kind,
        &unescape(gpu_model)?,
        start.parse().ok()?,
        end.parse().ok()?,
    );
    (id.as_str() == text).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_round_trip_through_text_even_with_escaped_names() {
        for (source, ns, name) in [("meter", "ns", "d"), ("a|b%7C", "n%s|x", "dep|deployment/y%25")] {
            for kind in KINDS {
                let subject = if kind == UsageKind::RentalHours {
                    Subject::Rental(name.into())
                } else {
                    Subject::Deployment(name.into())
                };
                let id = RecordId::new(source, ns, &subject, kind, "H|100", -5, 60_000);
                assert_eq!(parse_record_id(id.as_str()), Some(id.clone()), "{id}");
            }
        }
        assert_eq!(parse_record_id("not an id"), None);
        assert_eq!(parse_record_id("m|n|pod/x|credit|H|0|1"), None, "unknown subject kind");
        assert_eq!(parse_record_id("m|n|rental/x|credit|H|0|1x"), None, "bad number");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let r = UsageRecord::new(
            "meter",
            "ns",
            Subject::Deployment("d".into()),
            UsageKind::Serverless(ServerlessPhase::Busy),
            "H100",
            Quantity::MicroGpuSeconds(5),
            Money::from_nanos(7),
            0,
            1,
        );
        let mut w = Writer::default();
        w.record(&r);
        assert_eq!(Reader::new(&w.buf, "record").record().unwrap(), r);
        for cut in 0..w.buf.len() {
            assert!(Reader::new(&w.buf[..cut], "record").record().is_err(), "cut at {cut}");
        }
    }
}
