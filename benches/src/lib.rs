//! Shared inputs for fd's benchmarks (the benchmarks themselves live in `benches/`).

use std::path::PathBuf;

/// Environment variable naming an uncompressed layer tar to benchmark with.
pub const LAYER_ENV: &str = "FD_BENCH_LAYER";

/// Size of the synthetic input used when [`LAYER_ENV`] is not set.
pub const SYNTHETIC_LEN: usize = 64 << 20;

/// Benchmark input and a description of where it came from.
pub struct Input {
    /// What the bytes are, for the benchmark's output.
    pub description: String,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The file named by `FD_BENCH_LAYER` if set, else [`synthetic_layer`]`(SYNTHETIC_LEN)`.
///
/// # Panics
/// If `FD_BENCH_LAYER` is set but cannot be read: a benchmark silently measuring
/// something else would be worse.
pub fn layer_input() -> Input {
    match std::env::var_os(LAYER_ENV) {
        Some(path) => {
            let path = PathBuf::from(path);
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{LAYER_ENV}={}: {e}", path.display()));
            Input {
                description: format!("layer tar {} ({} bytes)", path.display(), data.len()),
                data,
            }
        }
        None => Input {
            description: format!(
                "synthetic {} MiB layer-like buffer (set {LAYER_ENV} to use a real layer tar)",
                SYNTHETIC_LEN >> 20
            ),
            data: synthetic_layer(SYNTHETIC_LEN),
        },
    }
}

/// A deterministic buffer that looks roughly like an image layer: about half
/// incompressible pseudo-random runs (binaries, compressed assets), about half text-like
/// runs (source, config, docs: words and lines from a small vocabulary), 512-byte tar-like
/// headers between "files", and some zero padding.
pub fn synthetic_layer(len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "usr", "lib", "include", "static", "const", "return", "if", "else", "for", "while",
        "int", "char", "void", "struct", "error", "config", "path", "file", "value", "name",
        "version", "license", "package", "install", "self", "fn", "let", "match", "=", "{", "}",
        "(", ")", ";", "#", "//", "0", "1", "42", "true", "false", "null",
    ];
    let mut rng = SplitMix64(0x6664_6265_6e63_6821);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // tar-like header: a name, some octal fields, zero padding to 512 bytes
        let header_start = out.len();
        out.extend_from_slice(format!("usr/share/fd/file-{:016x}", rng.next()).as_bytes());
        for field in [&b"0000644"[..], b"0001750", b"0001750"] {
            out.push(0);
            out.extend_from_slice(field);
        }
        out.resize(header_start + 512, 0);

        let file_len = 1024 + (rng.next() % (256 * 1024)) as usize;
        let file_start = out.len();
        if rng.next().is_multiple_of(2) {
            while out.len() < file_start + file_len {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            while out.len() < file_start + file_len {
                let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
                out.extend_from_slice(word.as_bytes());
                out.push(if rng.next().is_multiple_of(12) {
                    b'\n'
                } else {
                    b' '
                });
            }
        }
        out.truncate(file_start + file_len);
        // pad to a 512-byte block like tar does
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.truncate(len);
    out
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_sized() {
        let a = synthetic_layer(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        assert_eq!(a, synthetic_layer(1 << 20));
    }
}
