//! Throughput of the chunk store's ingest path — FastCDC boundaries + BLAKE3 chunk ids +
//! bao outboards — over one layer, next to BLAKE3 alone and a plain memory copy of the same
//! bytes.
//!
//! Input: the uncompressed layer tar named by `FD_BENCH_LAYER`, else a deterministic 64 MiB
//! layer-like buffer (printed at start).
//!
//! `cargo bench -p fd-benches --bench chunker`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use fd_benches::layer_input;
use fd_chunker::{ChunkerConfig, chunk_reader, chunk_slice, outboard};

fn bench_ingest(c: &mut Criterion) {
    let input = layer_input();
    let data = input.data;
    let cfg = ChunkerConfig::default();
    let spans = chunk_slice(&data, &cfg);
    println!("input: {}", input.description);
    println!(
        "chunks: {} (avg {} bytes) with {}/{}/{} KiB",
        spans.len(),
        data.len() / spans.len().max(1),
        cfg.min_size >> 10,
        cfg.avg_size >> 10,
        cfg.max_size >> 10
    );

    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Bytes(data.len() as u64));
    // Each iteration is tens of milliseconds; flat sampling keeps the run short.
    group.sampling_mode(SamplingMode::Flat);

    let mut copy = vec![0u8; data.len()];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            copy.copy_from_slice(black_box(&data));
            black_box(&copy);
        })
    });

    group.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&data))));

    // Boundaries + ids for bytes already in memory.
    group.bench_function("chunk_slice (cdc+blake3)", |b| {
        b.iter(|| chunk_slice(black_box(&data), &cfg))
    });

    // The ingest path: stream through the chunker, name each chunk, build its outboard.
    group.bench_function("chunk_reader+outboard (cdc+blake3+bao)", |b| {
        b.iter(|| {
            let mut outboard_bytes = 0usize;
            for chunk in chunk_reader(black_box(&data[..]), &cfg) {
                let chunk = chunk.expect("reading from memory");
                let ob = outboard(&chunk.data);
                debug_assert_eq!(ob.root(), chunk.id);
                outboard_bytes += ob.as_bytes().len();
            }
            black_box(outboard_bytes)
        })
    });

    // Same, fused: the id is the outboard's root, so every byte is hashed once.
    group.bench_function("chunk_reader.with_outboards (fused)", |b| {
        b.iter(|| {
            let mut outboard_bytes = 0usize;
            for item in chunk_reader(black_box(&data[..]), &cfg).with_outboards() {
                let (_chunk, ob) = item.expect("reading from memory");
                outboard_bytes += ob.as_bytes().len();
            }
            black_box(outboard_bytes)
        })
    });

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_ingest
}
criterion_main!(benches);
