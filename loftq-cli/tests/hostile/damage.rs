//! Editing helpers: the damage done to well-formed files.

use super::*;

/// The header of a safetensors file and the offset of its data.
pub(super) fn st_header(bytes: &[u8]) -> (serde_json::Map<String, Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), 8 + n)
}

/// Rewrites the header of the safetensors file `path` with `edit`, the data unchanged.
pub(super) fn st_edit(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let (mut header, start) = st_header(&bytes);
    edit(&mut header);
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[start..]);
    std::fs::write(path, out).unwrap();
}

/// The first tensor entry of a header whose name contains `part`.
pub(super) fn entry<'a>(h: &'a mut serde_json::Map<String, Value>, part: &str) -> &'a mut Value {
    let key = h
        .keys()
        .find(|k| k.contains(part) && *k != "__metadata__")
        .unwrap_or_else(|| panic!("no tensor with `{part}`"))
        .clone();
    h.get_mut(&key).unwrap()
}

/// Overwrites the first `f32` of the tensor named with `part` in `path` with `v`.
pub(super) fn st_poke(path: &Path, part: &str, v: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let (mut header, start) = st_header(&bytes);
    let begin = entry(&mut header, part)["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[start + begin..start + begin + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

pub(super) fn json_edit(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

pub(super) fn truncate(path: &Path, keep: impl FnOnce(usize) -> usize) {
    let bytes = std::fs::read(path).unwrap();
    let n = keep(bytes.len());
    std::fs::write(path, &bytes[..n]).unwrap();
}

/// The byte-level damage every safetensors file gets: `(label, damage)`.
pub(super) fn safetensors_damage(tensor: &'static str) -> Vec<(&'static str, Damage)> {
    vec![
        ("empty", Box::new(|p| truncate(p, |_| 0))),
        ("short", Box::new(|p| truncate(p, |_| 5))),
        ("cut-header", Box::new(|p| truncate(p, |_| 40))),
        ("cut-data", Box::new(|p| truncate(p, |n| n - 100))),
        (
            "huge-header-len",
            Box::new(|p| {
                let mut b = std::fs::read(p).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(p, b).unwrap();
            }),
        ),
        (
            "garbage-header",
            Box::new(|p| {
                let mut b = std::fs::read(p).unwrap();
                for x in &mut b[8..40] {
                    *x = b'#';
                }
                std::fs::write(p, b).unwrap();
            }),
        ),
        (
            "dtype",
            Box::new(move |p| st_edit(p, |h| entry(h, tensor)["dtype"] = json!("Q99"))),
        ),
        (
            "shape-overflow",
            Box::new(move |p| {
                st_edit(p, |h| {
                    entry(h, tensor)["shape"] = json!([u64::MAX / 2, u64::MAX / 2]);
                })
            }),
        ),
        (
            "offsets-past-end",
            Box::new(move |p| {
                st_edit(p, |h| {
                    entry(h, tensor)["data_offsets"] = json!([0, 1u64 << 40]);
                })
            }),
        ),
        (
            "offsets-reversed",
            Box::new(move |p| {
                st_edit(p, |h| {
                    let e = entry(h, tensor);
                    let o = e["data_offsets"].clone();
                    e["data_offsets"] = json!([o[1], o[0]]);
                })
            }),
        ),
        (
            "shape-size-mismatch",
            Box::new(move |p| {
                st_edit(p, |h| {
                    let e = entry(h, tensor);
                    let mut shape = e["shape"].as_array().unwrap().clone();
                    shape[0] = json!(shape[0].as_u64().unwrap() + 1);
                    e["shape"] = Value::Array(shape);
                })
            }),
        ),
        (
            "not-an-object",
            Box::new(|p| {
                let mut out = 2u64.to_le_bytes().to_vec();
                out.extend(b"[]");
                std::fs::write(p, out).unwrap();
            }),
        ),
    ]
}

/// Edits the packed header (JSON in the metadata) of the first weight named with `part`.
pub(super) fn packed_header(p: &Path, part: &str, edit: impl FnOnce(&mut Value)) {
    st_edit(p, |h| {
        let m = h["__metadata__"].as_object_mut().unwrap();
        let key = m.keys().find(|k| k.contains(part)).unwrap().clone();
        let mut q: Value = serde_json::from_str(m[&key].as_str().unwrap()).unwrap();
        edit(&mut q);
        m[&key] = json!(q.to_string());
    })
}

pub(super) fn set_bits(q: &mut Value, bits: u64) {
    match q {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if k == "bits" {
                    *v = json!(bits);
                } else {
                    set_bits(v, bits);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| set_bits(v, bits)),
        _ => {}
    }
}

/// Edits the JSON quantization state of the bitsandbytes q_proj of layer 0.
pub(super) fn bnb_state(p: &Path, edit: impl FnOnce(&mut Value)) {
    let mut bytes = std::fs::read(p).unwrap();
    let (mut header, start) = st_header(&bytes);
    let key = header
        .keys()
        .find(|k| k.contains("layers.0.self_attn.q_proj") && k.contains("quant_state"))
        .expect("a quant_state tensor")
        .clone();
    let e = header.get_mut(&key).unwrap();
    let [b, end] = [0, 1].map(|i| e["data_offsets"][i].as_u64().unwrap() as usize);
    let mut st: Value = serde_json::from_slice(&bytes[start + b..start + end]).unwrap();
    edit(&mut st);
    // The new state replaces the old one at the end of the data; the old bytes stay unused.
    let new = st.to_string().into_bytes();
    let data_len = (bytes.len() - start) as u64;
    e["data_offsets"] = json!([data_len, data_len + new.len() as u64]);
    e["shape"] = json!([new.len()]);
    bytes.extend(&new);
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[start..]);
    std::fs::write(p, out).unwrap();
}

pub(super) fn poke(p: &Path, at: usize, v: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[at..at + v.len()].copy_from_slice(v);
    std::fs::write(p, b).unwrap();
}

pub(super) fn rewrite_gguf(p: &Path, over: &[(&'static str, MetaValue)]) {
    std::fs::write(p, gguf_bytes(&gguf_meta(over), &gguf_tensors())).unwrap();
}

pub(super) fn gguf_with(p: &Path, edit: impl Fn(&mut RawTensor)) {
    let mut t = gguf_tensors();
    t.iter_mut().for_each(edit);
    std::fs::write(p, gguf_bytes(&gguf_meta(&[]), &t)).unwrap();
}

/// A GGUF file whose vocabulary array claims 2^40 strings in a few bytes.
pub(super) fn huge_gguf_array(p: &Path) {
    let marker = 0x5a5a_5a5a_5a5a_5a5au64;
    let arr = MetaValue::Array(vec![MetaValue::U64(marker)]);
    let bytes = gguf_bytes(
        &gguf_meta(&[("tokenizer.ggml.tokens", arr)]),
        &gguf_tensors(),
    );
    // Array layout: element type (u32), count (u64), elements: the count precedes the marker.
    let at = bytes
        .windows(8)
        .position(|w| w == marker.to_le_bytes())
        .unwrap();
    let mut bytes = bytes;
    bytes[at - 8..at].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(p, bytes).unwrap();
}
