//! # tensorbus-fuzz
//!
//! A mutation fuzzer on the stable toolchain, for the decoders that take bytes from outside a
//! process (host commands and their payloads, control-protocol JSON, TCP frame headers). Inputs
//! are valid encodings (seeds) mutated by proptest-generated edits — bit flips, boundary integers
//! (msgpack `uint64`/`int64` markers, `2^64 - 1`, `2^63`), insertions, deletions, truncations —
//! plus wholly random bytes. Each target runs for `TENSORBUS_FUZZ_SECS` seconds (default 2);
//! `./scripts/test.sh` gives each a longer budget. A panic is reported with the input in hex, to
//! become a regression test. There is no shrinking and no coverage feedback: cargo-fuzz needs a
//! nightly toolchain, which the test command does not install.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// A boundary integer, big-endian (msgpack) or little-endian (frames), at a position.
    Splice(usize, u64, bool),
}

const BYTES: [u8; 12] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc4, 0xcf, 0xd3, 0xdd, 0xdf, 0x92];
const NUMBERS: [u64; 8] = [0, 1, 7, 1 << 31, 1 << 32, 1 << 62, 1 << 63, u64::MAX];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, 1 << b)),
        (any::<usize>(), prop::sample::select(&BYTES[..])).prop_map(|(p, b)| Edit::Set(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, v)| Edit::Insert(p, v)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), prop::sample::select(&NUMBERS[..]), any::<bool>())
            .prop_map(|(p, n, be)| Edit::Splice(p, n, be)),
    ]
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |p: usize, b: &Vec<u8>| if b.is_empty() { 0 } else { p % (b.len() + 1) };
        match e {
            Edit::Flip(p, m) if !b.is_empty() => {
                let i = p % b.len();
                b[i] ^= m;
            }
            Edit::Set(p, v) if !b.is_empty() => {
                let i = p % b.len();
                b[i] = *v;
            }
            Edit::Insert(p, v) => {
                let i = at(*p, &b);
                b.splice(i..i, v.iter().copied());
            }
            Edit::Delete(p, n) if !b.is_empty() => {
                let i = p % b.len();
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Truncate(p) => {
                let i = at(*p, &b);
                b.truncate(i);
            }
            Edit::Splice(p, n, be) => {
                let i = at(*p, &b);
                let bytes = if *be { n.to_be_bytes() } else { n.to_le_bytes() };
                let end = (i + 8).min(b.len());
                b.splice(i..end, bytes);
            }
            _ => {}
        }
    }
    b
}

/// What one fuzz run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub inputs: u64,
    pub elapsed: Duration,
}

/// The time budget per target: `TENSORBUS_FUZZ_SECS`, default 2 s.
pub fn budget() -> Duration {
    let secs = std::env::var("TENSORBUS_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs.clamp(0.01, 3600.0))
}

/// Feeds `target` mutated seeds (and random bytes) for [`budget`]; panics, naming the input in
/// hex, if the target panics on one. Deterministic for a given `name` and number of inputs.
pub fn fuzz(name: &str, seeds: &[Vec<u8>], mut target: impl FnMut(&[u8])) -> Report {
    assert!(!seeds.is_empty(), "fuzz target {name} has no seeds");
    let mut seed = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b;
    }
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = (
        0..seeds.len(),
        prop::collection::vec(edit(), 0..6),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..256)),
    );
    let (start, budget) = (Instant::now(), budget());
    let mut inputs = 0u64;
    // Every seed as it is first, then mutations until the budget is spent.
    let mut pending: Vec<Vec<u8>> = seeds.to_vec();
    while !pending.is_empty() || start.elapsed() < budget {
        let input = match pending.pop() {
            Some(s) => s,
            None => {
                let (k, edits, random) = strategy.new_tree(&mut runner).expect("strategy").current();
                random.unwrap_or_else(|| apply(seeds[k].clone(), &edits))
            }
        };
        inputs += 1;
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("fuzz target {name} panicked after {inputs} inputs on input (hex) {hex}");
        }
    }
    let r = Report { inputs, elapsed: start.elapsed() };
    eprintln!("fuzz {name}: {} inputs in {:.1} s, no crash", r.inputs, r.elapsed.as_secs_f64());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_stay_in_bounds_and_change_inputs() {
        let seed = vec![1u8, 2, 3, 4];
        let mut changed = 0;
        let r = fuzz("self-test", &[seed.clone(), vec![]], |b| {
            if b != seed.as_slice() {
                changed += 1;
            }
        });
        assert!(r.inputs >= 2);
        assert!(changed > 0);
        assert_eq!(
            apply(vec![0; 4], &[Edit::Splice(2, u64::MAX, true)]),
            vec![0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(apply(vec![9; 4], &[Edit::Truncate(1), Edit::Delete(0, 5)]), Vec::<u8>::new());
    }
}
