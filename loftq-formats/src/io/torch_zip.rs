//! The zip archive `torch.save` writes since PyTorch 1.6: entries stored uncompressed, each
//! one's data aligned, zip64 records past 4 GiB. Only what reading such an archive needs.

use std::collections::HashMap;
use std::ops::Range;

const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;
/// A 32-bit field saying "see the zip64 record".
const FULL32: u64 = 0xFFFF_FFFF;

/// Byte ranges of the archive's entries, by name.
pub(crate) type Entries = HashMap<String, Range<usize>>;

fn u16_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 2)
        .map(|s| u64::from(u16::from_le_bytes([s[0], s[1]])))
        .ok_or_else(|| format!("zip record cut short at byte {at}"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 4)
        .map(|s| u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
        .ok_or_else(|| format!("zip record cut short at byte {at}"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    let s = b
        .get(at..at + 8)
        .ok_or_else(|| format!("zip record cut short at byte {at}"))?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn index(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("zip offset {v} does not fit in memory"))
}

/// Lists the entries of the archive `b`.
///
/// # Errors
/// A message for a file that is not a zip archive, a record that is cut short or points
/// outside the file, or a compressed entry (`torch.save` stores its entries).
pub(crate) fn entries(b: &[u8]) -> Result<Entries, String> {
    // The end record is the last 22 bytes, unless a comment (at most 64 KiB) follows it.
    let lowest = b.len().saturating_sub(22 + 0xFFFF);
    let end = (lowest..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(b, i) == Ok(u64::from(EOCD)))
        .ok_or("not a zip archive (no end of central directory record)")?;
    let (mut count, mut dir) = (u16_at(b, end + 10)?, u32_at(b, end + 16)?);
    if count == 0xFFFF || dir == FULL32 {
        let loc = end.checked_sub(20).ok_or("zip64 locator missing")?;
        if u32_at(b, loc)? != u64::from(EOCD64_LOCATOR) {
            return Err("zip64 locator missing".into());
        }
        let rec = index(u64_at(b, loc + 8)?)?;
        if u32_at(b, rec)? != u64::from(EOCD64) {
            return Err("zip64 end record missing".into());
        }
        (count, dir) = (u64_at(b, rec + 32)?, u64_at(b, rec + 48)?);
    }
    let mut at = index(dir)?;
    let mut out = HashMap::new();
    for _ in 0..count {
        if u32_at(b, at)? != u64::from(CENTRAL) {
            return Err(format!("bad central directory entry at byte {at}"));
        }
        let method = u16_at(b, at + 10)?;
        let (mut packed, mut size) = (u32_at(b, at + 20)?, u32_at(b, at + 24)?);
        let name_len = index(u16_at(b, at + 28)?)?;
        let extra_len = index(u16_at(b, at + 30)?)?;
        let comment_len = index(u16_at(b, at + 32)?)?;
        let mut local = u32_at(b, at + 42)?;
        let name_bytes = b
            .get(at + 46..at + 46 + name_len)
            .ok_or("zip entry name cut short")?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("zip extra field cut short")?;
        zip64_sizes(extra, &mut size, &mut packed, &mut local)?;
        if method != 0 || packed != size {
            return Err(format!(
                "entry `{name}` is compressed (method {method}); torch.save stores entries"
            ));
        }
        let local = index(local)?;
        if u32_at(b, local)? != u64::from(LOCAL) {
            return Err(format!("entry `{name}`: bad local header"));
        }
        let start = local + 30 + index(u16_at(b, local + 26)?)? + index(u16_at(b, local + 28)?)?;
        let stop = start
            .checked_add(index(size)?)
            .filter(|&s| s <= b.len())
            .ok_or_else(|| format!("entry `{name}` runs past the end of the file"))?;
        out.insert(name, start..stop);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// Replaces the 32-bit fields that say "see zip64" by the extra field's 64-bit values (in
/// the order the format lists them: size, compressed size, offset).
fn zip64_sizes(
    mut extra: &[u8],
    size: &mut u64,
    packed: &mut u64,
    local: &mut u64,
) -> Result<(), String> {
    while extra.len() >= 4 {
        let (id, len) = (u16_at(extra, 0)?, index(u16_at(extra, 2)?)?);
        let body = extra.get(4..4 + len).ok_or("zip extra field cut short")?;
        if id == 1 {
            let mut at = 0;
            for field in [size, packed, local] {
                if *field == FULL32 {
                    *field = u64_at(body, at)?;
                    at += 8;
                }
            }
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}
