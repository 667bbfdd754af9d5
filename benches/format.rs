//! Criterion benches: record-header encode/decode and xxh3 payload checksum throughput.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use cwm::checksum::payload_checksum;
use cwm::store::format::{RecordHeader, RecordKind};

fn header(c: &mut Criterion) {
    let h = RecordHeader {
        kind: RecordKind::Block,
        seq: 123_456,
        key: 0xdead_beef_u128 << 64 | 77,
        payload_len: 2 << 20,
        payload_xxh3: 99,
        segment_id: 4,
        copied: false,
        ditto: false,
    };
    let mut page = vec![0u8; 4096];
    c.bench_function("record_header_encode", |b| {
        b.iter(|| h.encode(black_box(42), black_box(&mut page)))
    });
    h.encode(42, &mut page);
    c.bench_function("record_header_decode", |b| {
        b.iter(|| RecordHeader::decode(black_box(&page), black_box(42)))
    });
}

fn checksum(c: &mut Criterion) {
    let data = vec![0x5au8; 2 << 20];
    let mut g = c.benchmark_group("payload_xxh3");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("2MiB", |b| b.iter(|| payload_checksum(black_box(&data))));
    g.finish();
}

criterion_group!(benches, header, checksum);
criterion_main!(benches);
