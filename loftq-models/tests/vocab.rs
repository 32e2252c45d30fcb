//! GGUF vocabularies against llama.cpp: the token ids of llama.cpp's own tokenizer test
//! strings and of the first 4 kB of Hamlet, for GPT-2's, Qwen2's and Llama 3's byte-level BPE
//! and Llama 2's SentencePiece
//! (vocabulary files and the test strings from llama.cpp's `models/`; the Hamlet ids from
//! llama.cpp through llama-cpp-python, `fixtures/vocab/make_vocab.py`).

mod common;

use std::path::PathBuf;

use loftq_models::io::Gguf;
use loftq_models::tokenizer::Tokenizer;

fn vocab_dir() -> PathBuf {
    common::fixture("vocab")
}

fn ids(line: &str) -> Vec<u32> {
    line.split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

fn tokenizer(name: &str, dir: &std::path::Path) -> Tokenizer {
    let path = common::vocab_gguf(name, dir);
    Tokenizer::from_vocabulary(&Gguf::open(&path).unwrap()).unwrap()
}

#[test]
fn vocabularies_give_llama_cpp_token_ids() {
    let dir = common::scratch("vocab");
    let read = |f: &str| std::fs::read_to_string(vocab_dir().join(f)).unwrap();
    for name in ["gpt-2", "qwen2", "llama-bpe", "llama-spm"] {
        let tok = tokenizer(name, &dir);
        let inp = read(&format!("{name}.inp"));
        let cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let out = read(&format!("{name}.out"));
        let want: Vec<&str> = out.split('\n').collect();
        assert_eq!(cases.len(), want.len(), "{name}: cases");
        let mut checked = 0;
        for (text, want) in cases.iter().zip(&want).filter(|(t, _)| !t.is_empty()) {
            assert_eq!(tok.encode(text).unwrap(), ids(want), "{name}: {text:?}");
            checked += 1;
        }
        assert!(checked >= 40, "{name}: {checked} cases");
        let hamlet = read("hamlet-4k.txt");
        let want = ids(&read(&format!("{name}.hamlet.out")));
        assert_eq!(tok.encode(&hamlet).unwrap(), want, "{name}: Hamlet");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
