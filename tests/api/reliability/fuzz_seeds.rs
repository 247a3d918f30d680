//! The fuzz target's property (`fuzz/src/check.rs`) over its seed corpus and over random
//! mutations of it, so it runs on stable in every `cargo test` too; `reliability/run.sh`
//! runs the real `cargo fuzz` target.

use rand::{Rng, SeedableRng};

use super::fuzz_check::check;

#[test]
fn push_request_decoder_holds_on_seeds_and_mutations() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/push_request");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("the seed corpus")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5);
    for s in &seeds {
        check(s);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    const BYTES: &[u8] = b"{}[]\",:0123456789.eE+-tfnul\\ \x00\xff";
    for _ in 0..3000 {
        let mut m = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..=m.len());
            match rng.gen_range(0..3) {
                0 if i < m.len() => {
                    m.remove(i);
                }
                1 if i < m.len() => m[i] = BYTES[rng.gen_range(0..BYTES.len())],
                _ => m.insert(i, BYTES[rng.gen_range(0..BYTES.len())]),
            }
        }
        check(&m);
    }
}
