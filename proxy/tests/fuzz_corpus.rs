//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/*`) through the same entry points
//! the fuzzers use, so every input a fuzzer ever kept stays a regression test.

#[test]
fn fuzz_corpus_replays_without_panics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in meshgate::fuzz_targets::TARGETS {
        let dir = root.join(name);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!entries.is_empty(), "corpus {} is empty", dir.display());
        for path in entries {
            let data = std::fs::read(&path).unwrap();
            target(&data);
        }
        eprintln!("{name}: replayed {} inputs", std::fs::read_dir(&dir).unwrap().count());
    }
}
