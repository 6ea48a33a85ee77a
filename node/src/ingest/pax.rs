//! PAX extended-header records, parsed from the raw header bytes of one tar entry.
//!
//! A PAX record is `LEN KEY=VALUE\n` where LEN counts the whole record, so values may hold any
//! byte, newlines included. Parsing by length is the only correct way; parsing by lines (as
//! the tar crate does) misreads binary xattr values and can be tricked into seeing records
//! that are not there. Such a disagreement on a record that changes how the archive is framed
//! (`size`) is refused, since two readers would then see two different archives.

use std::collections::BTreeMap;

/// Records by key; for keys given twice, the last wins, as the PAX standard says.
pub(super) type Records = BTreeMap<Vec<u8>, Vec<u8>>;

const BLOCK: usize = 512;

/// Parses the PAX records that apply to the entry whose headers are in `bytes`. `bytes` are
/// the raw archive bytes from stream offset `start` up to the entry's data: padding of the
/// previous entry, then extension headers and their data, then the entry's own header.
pub(super) fn records_before_entry(bytes: &[u8], start: u64) -> Result<Records, &'static str> {
    let mut at = (start.next_multiple_of(BLOCK as u64) - start) as usize;
    let mut records = Records::new();
    while at + BLOCK <= bytes.len() {
        let header = &bytes[at..at + BLOCK];
        let size = usize::try_from(header_size(header).ok_or("unreadable header size")?)
            .map_err(|_| "header size too large")?;
        let data_start = at + BLOCK;
        match header[156] {
            b'x' => {
                let data = bytes
                    .get(data_start..data_start + size)
                    .ok_or("truncated PAX header")?;
                let parsed = parse(data)?;
                check_framing_agrees(data, &parsed)?;
                records.extend(parsed);
            }
            // GNU long names and global headers: the tar crate applies or skips them.
            b'L' | b'K' | b'g' => {}
            // The entry's own header: done.
            _ => break,
        }
        at = data_start + size.next_multiple_of(BLOCK);
    }
    Ok(records)
}

/// Parses `LEN KEY=VALUE\n` records by their length prefix.
fn parse(mut data: &[u8]) -> Result<Records, &'static str> {
    let mut out = Records::new();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record with a bad length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length does not match its contents");
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        out.insert(body[..eq].to_vec(), body[eq + 1..].to_vec());
        data = &data[len..];
    }
    Ok(out)
}

/// The tar crate frames entries using its own, line-based reading of the `size` record; if it
/// would read a different size than the records really hold, the archive is ambiguous.
fn check_framing_agrees(data: &[u8], parsed: &Records) -> Result<(), &'static str> {
    let mut naive = None;
    for ext in tar::PaxExtensions::new(data) {
        let Ok(ext) = ext else { break };
        if ext.key_bytes() == b"size" {
            naive = Some(ext.value_bytes().to_vec());
            break;
        }
    }
    let real = parsed.get(b"size".as_slice());
    if naive.as_ref() != real && (naive.is_some() || real.is_some()) {
        return Err("ambiguous PAX records (a value hides a size record)");
    }
    Ok(())
}

/// The size field of a tar header: octal, or GNU base-256 when the top bit is set.
fn header_size(header: &[u8]) -> Option<u64> {
    let field = &header[124..136];
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .filter(|b| (b'0'..=b'7').contains(b))
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
        let body_len = key.len() + value.len() + 3;
        let mut n = body_len + 1;
        while n.to_string().len() + body_len != n {
            n += 1;
        }
        let mut out = format!("{n} ").into_bytes();
        out.extend_from_slice(key);
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    #[test]
    fn pax_binary_values_with_newlines_parse_by_length() -> Result<(), &'static str> {
        let mut data = record(b"SCHILY.xattr.user.bin", b"a\nb\x00\xff");
        data.extend(record(b"path", b"x/y"));
        let parsed = parse(&data)?;
        assert_eq!(
            parsed
                .get(b"SCHILY.xattr.user.bin".as_slice())
                .map(Vec::as_slice),
            Some(&b"a\nb\x00\xff"[..])
        );
        assert_eq!(
            parsed.get(b"path".as_slice()).map(Vec::as_slice),
            Some(&b"x/y"[..])
        );
        Ok(())
    }

    #[test]
    fn pax_size_after_a_binary_value_is_refused() -> Result<(), &'static str> {
        // A line-based reader stops at the binary value and never sees the size record, so it
        // would frame the archive differently from a correct reader.
        let mut data = record(b"SCHILY.xattr.user.bin", b"a\nb");
        data.extend(record(b"size", b"12"));
        let parsed = parse(&data)?;
        assert!(check_framing_agrees(&data, &parsed).is_err());
        // Without a size record both readers agree.
        let data = record(b"SCHILY.xattr.user.bin", b"a\nb");
        assert!(check_framing_agrees(&data, &parse(&data)?).is_ok());
        Ok(())
    }

    #[test]
    fn pax_bad_lengths_are_errors() {
        assert!(parse(b"99 path=x\n").is_err());
        assert!(parse(b"path=x\n").is_err());
    }
}
