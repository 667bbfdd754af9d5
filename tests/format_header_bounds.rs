//! The header decoders refuse what no writer produces and accept exactly what was written
//! (mutation testing of `src/store/format.rs` found these boundaries untested: an unknown
//! version taken for a known one, the segment-size and sealed-length checks, a header of
//! exactly 64 bytes taken for a truncated one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cwm::store::format::{
    HeaderError, RecordHeader, RecordKind, SegmentHeader, PAGE, RECORD_HEADER_LEN, SEGMENT_VERSION,
};

fn header(version: u16, segment_size: u64) -> SegmentHeader {
    SegmentHeader {
        segment_id: 7,
        generation: 0x5eed,
        segment_size,
        created_unix_ms: 1_764_806_400_000,
        version,
        sealed_len: 0,
        record_limit: 0,
    }
}

fn decode(h: &SegmentHeader) -> Result<SegmentHeader, HeaderError> {
    let mut page = vec![0u8; PAGE as usize];
    h.encode(&mut page);
    SegmentHeader::decode(&page)
}

#[test]
fn every_written_version_decodes_to_what_was_written() {
    for v in [1, 2, SEGMENT_VERSION] {
        let h = header(v, 64 << 20);
        assert_eq!(decode(&h), Ok(h), "version {v}");
    }
}

#[test]
fn an_unknown_version_is_refused_even_with_a_valid_checksum() {
    for v in [0, SEGMENT_VERSION + 1, u16::MAX] {
        assert_eq!(decode(&header(v, 64 << 20)), Err(HeaderError::Version(v)));
    }
}

#[test]
fn segment_size_must_be_whole_pages_and_hold_a_header_and_a_record() {
    let field = Err(HeaderError::Field("segment_size"));
    assert_eq!(decode(&header(SEGMENT_VERSION, PAGE)), field, "one page");
    assert_eq!(decode(&header(SEGMENT_VERSION, 0)), field, "zero");
    let smallest = header(SEGMENT_VERSION, 2 * PAGE);
    assert_eq!(decode(&smallest), Ok(smallest), "two pages is the least");
    assert_eq!(
        decode(&header(SEGMENT_VERSION, 3 * PAGE + 512)),
        field,
        "not a whole number of pages"
    );
}

fn sealed(sealed_len: u64) -> SegmentHeader {
    SegmentHeader {
        sealed_len,
        ..header(SEGMENT_VERSION, 16 * PAGE)
    }
}

#[test]
fn a_sealed_length_lies_between_the_first_record_and_the_end_in_whole_pages() {
    let field = Err(HeaderError::Field("sealed_len"));
    let first = sealed(0).first_record();
    assert_eq!(first, 2 * PAGE, "format 2: header page and its copy");
    for ok in [first, 5 * PAGE, 16 * PAGE] {
        assert_eq!(decode(&sealed(ok)), Ok(sealed(ok)), "sealed at {ok}");
    }
    for bad in [PAGE, first - 1, 17 * PAGE, 32 * PAGE, 5 * PAGE + 512] {
        assert_eq!(decode(&sealed(bad)), field, "sealed at {bad}");
    }
}

#[test]
fn headers_decode_from_exactly_their_own_length() {
    let h = header(SEGMENT_VERSION, 64 << 20);
    let mut page = vec![0u8; PAGE as usize];
    h.encode(&mut page);
    assert_eq!(SegmentHeader::decode(&page[..64]), Ok(h));
    assert_eq!(
        SegmentHeader::decode(&page[..63]),
        Err(HeaderError::Truncated)
    );
    // A second (ditto) copy exists only of metadata records.
    for (kind, copied, ditto) in [
        (RecordKind::Block, false, false),
        (RecordKind::Block, true, false),
        (RecordKind::Manifest, false, true),
        (RecordKind::Tombstone, true, true),
    ] {
        let r = RecordHeader {
            kind,
            seq: 9,
            key: 0xfeed,
            payload_len: 10,
            payload_xxh3: 11,
            segment_id: 7,
            copied,
            ditto,
        };
        r.encode(0x5eed, &mut page);
        let exact = &page[..RECORD_HEADER_LEN];
        assert_eq!(RecordHeader::decode(exact, 0x5eed), Ok(r));
        assert_eq!(
            RecordHeader::decode(&exact[..RECORD_HEADER_LEN - 1], 0x5eed),
            Err(HeaderError::Truncated)
        );
    }
}

#[test]
fn a_payload_length_is_between_one_byte_and_one_tib() {
    let mut page = vec![0u8; PAGE as usize];
    let at = |len: u64, page: &mut [u8]| {
        let r = RecordHeader {
            kind: RecordKind::Block,
            seq: 1,
            key: 5,
            payload_len: len,
            payload_xxh3: 0,
            segment_id: 1,
            copied: false,
            ditto: false,
        };
        r.encode(3, page);
        (r, RecordHeader::decode(page, 3))
    };
    let field = Err(HeaderError::Field("payload_len"));
    for ok in [1, 1 << 40] {
        let (r, got) = at(ok, &mut page);
        assert_eq!(got, Ok(r), "{ok}");
    }
    for bad in [0, (1 << 40) + 1, u64::MAX] {
        assert_eq!(at(bad, &mut page).1, field, "{bad}");
    }
}

fn limited(record_limit: u64, sealed_len: u64) -> SegmentHeader {
    SegmentHeader {
        record_limit,
        sealed_len,
        ..header(SEGMENT_VERSION, 16 * PAGE)
    }
}

#[test]
fn a_record_limit_lies_between_the_first_record_and_the_end_and_covers_the_sealed_length() {
    let field = Err(HeaderError::Field("record_limit"));
    let first = limited(0, 0).first_record();
    for ok in [
        (0, 0),
        (first, 0),
        (5 * PAGE, 0),
        (16 * PAGE, 0),
        (5 * PAGE, 5 * PAGE),
    ] {
        let h = limited(ok.0, ok.1);
        assert_eq!(decode(&h), Ok(h), "limit {} sealed {}", ok.0, ok.1);
    }
    assert_eq!(decode(&limited(PAGE, 0)), field, "inside the header pages");
    assert_eq!(decode(&limited(17 * PAGE, 0)), field, "past the end");
    assert_eq!(
        decode(&limited(5 * PAGE, 6 * PAGE)),
        field,
        "sealed past the limit"
    );
}

#[test]
fn format_3_refuses_bytes_in_its_reserved_field_and_format_2_has_no_limit() {
    let h = limited(5 * PAGE, 0);
    let mut page = vec![0u8; PAGE as usize];
    h.encode(&mut page);
    assert_eq!(u32::from_le_bytes(page[12..16].try_into().unwrap()), 5);
    page[10] = 1;
    let sum = cwm::checksum::segment_header_checksum(&page[..56]);
    page[56..64].copy_from_slice(&sum.to_le_bytes());
    assert_eq!(
        SegmentHeader::decode(&page),
        Err(HeaderError::Field("reserved"))
    );
    // A format 2 header never carries a limit: those bytes were reserved there.
    let v2 = SegmentHeader {
        version: 2,
        ..limited(0, 0)
    };
    assert_eq!(
        decode(&SegmentHeader {
            record_limit: 5 * PAGE,
            ..v2
        }),
        Ok(v2)
    );
}
