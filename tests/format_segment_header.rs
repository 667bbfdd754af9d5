//! The segment header's decoder refuses what no writer produces and accepts what every
//! version wrote (mutation testing of `src/store/format.rs` found these boundaries untested:
//! an unknown version taken for a known one, the segment-size checks, a decoder answering a
//! default header).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cwm::store::format::{HeaderError, SegmentHeader, PAGE, SEGMENT_VERSION};

fn header(version: u16, segment_size: u64) -> SegmentHeader {
    SegmentHeader {
        segment_id: 7,
        generation: 0x5eed,
        segment_size,
        created_unix_ms: 1_764_806_400_000,
        version,
        sealed_len: 0,
    }
}

fn decode(h: &SegmentHeader) -> Result<SegmentHeader, HeaderError> {
    let mut page = vec![0u8; PAGE as usize];
    h.encode(&mut page);
    SegmentHeader::decode(&page)
}

#[test]
fn every_written_version_decodes_to_what_was_written() {
    for v in [1, SEGMENT_VERSION] {
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
