//! PyTorch `.bin` state dicts (`torch.save` of a dict of tensors, e.g. PEFT's
//! `adapter_model.bin` with `safe_serialization=False`): the zip archive and a restricted
//! reading of its pickle.
//!
//! The pickle is not run: it is read as data by a small machine that knows the opcodes
//! `torch.save` emits and only the callables a tensor dict needs (`OrderedDict`,
//! `_rebuild_tensor_v2`, `_rebuild_parameter`). Any other global, `os.system` included, is an
//! error. Tensor data stays in the memory-mapped file until a tensor is asked for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use memmap2::Mmap;

use super::safetensors::HostTensor;
use super::torch_zip::{Entries, entries};
use crate::{ModelError, Result};

/// A tensor of the dict: where its values lie in which storage.
#[derive(Clone, Debug, PartialEq)]
struct View {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
struct Storage {
    /// The storage class, e.g. `FloatStorage`.
    kind: String,
    /// Its entry `data/<key>` in the archive.
    key: String,
}

/// A value of the pickle. Containers carry how deeply they nest (a state dict nests 3 deep),
/// so that a hostile file cannot build one deep enough to overflow the stack when dropped.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Val>>, u8),
    List(Rc<Vec<Val>>, u8),
    Dict(Rc<Vec<(Val, Val)>>, u8),
    Global(Rc<str>),
    Storage(Storage),
    Tensor(Rc<View>),
}

/// Deeper containers are refused.
const MAX_DEPTH: u8 = 32;

impl Val {
    /// How deeply containers nest in this value (0: not a container).
    fn depth(&self) -> u8 {
        match self {
            Val::Tuple(_, d) | Val::List(_, d) | Val::Dict(_, d) => *d,
            _ => 0,
        }
    }

    /// What it is, for messages (never the whole value: it may be huge).
    fn describe(&self) -> String {
        let cut = |s: &str| s.chars().take(40).collect::<String>();
        match self {
            Val::None => "None".into(),
            Val::Bool(b) => b.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Str(s) => format!("the string `{}`", cut(s)),
            Val::Bytes(b) => format!("{} bytes", b.len()),
            Val::Tuple(t, _) => format!("a tuple of {}", t.len()),
            Val::List(l, _) => format!("a list of {}", l.len()),
            Val::Dict(d, _) => format!("a dict of {}", d.len()),
            Val::Global(g) => format!("`{}`", cut(g)),
            Val::Storage(_) => "a storage".into(),
            Val::Tensor(_) => "a tensor".into(),
        }
    }
}

/// The depth of a container that holds `items` besides what gave it `depth`.
fn deeper<'a>(
    depth: u8,
    items: impl IntoIterator<Item = &'a Val>,
) -> std::result::Result<u8, String> {
    let d = (items.into_iter())
        .map(|v| v.depth().saturating_add(1))
        .fold(depth.max(1), u8::max);
    if d > MAX_DEPTH {
        return Err(format!("containers nested more than {MAX_DEPTH} deep"));
    }
    Ok(d)
}

/// A `torch.save` file of tensors, opened.
pub struct TorchState {
    path: PathBuf,
    map: Mmap,
    entries: Entries,
    /// The archive's top folder, which names every entry.
    root: String,
    tensors: Vec<(String, View)>,
}

impl std::fmt::Debug for TorchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchState")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl TorchState {
    /// Opens `path` and reads its dict of tensors.
    ///
    /// # Errors
    /// [`ModelError`] naming the file: not a zip archive (e.g. the pre-1.6 format), a pickle
    /// that calls anything but the tensor constructors, a value that is not a dict of tensors.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: a read-only map, as for safetensors checkpoints: the file must not be
        // truncated while it is mapped.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let bad = |msg: String| ModelError::format(path, msg);
        if map.starts_with(&[0x80]) {
            return Err(bad(
                "PyTorch's legacy (pre-1.6) format is not read: load it in \
                            Python and save it again with torch.save, or as safetensors"
                    .into(),
            ));
        }
        let entries = entries(&map).map_err(bad)?;
        let pkl = entries
            .keys()
            .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| bad("no data.pkl in the archive: not a torch.save file".into()))?
            .clone();
        let root = pkl.trim_end_matches("data.pkl").to_string();
        if let Some(order) = entries.get(&format!("{root}byteorder"))
            && &map[order.clone()] != b"little"
        {
            return Err(bad("big-endian tensor data is not read".into()));
        }
        let top =
            unpickle(&map[entries[&pkl].clone()]).map_err(|e| bad(format!("data.pkl: {e}")))?;
        let Val::Dict(items, _) = top else {
            return Err(bad("data.pkl does not hold a dict of tensors".into()));
        };
        let mut tensors = Vec::with_capacity(items.len());
        for (k, v) in items.iter() {
            let (Val::Str(name), Val::Tensor(view)) = (k, v) else {
                return Err(bad(format!(
                    "entry {} is not a tensor named by a string",
                    k.describe()
                )));
            };
            tensors.push((name.to_string(), (**view).clone()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            entries,
            root,
            tensors,
        })
    }

    /// Tensor names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// Tensor `name` as `f32` (from f32, f16, bf16 or f64 storages).
    ///
    /// # Errors
    /// [`ModelError`] naming the file and tensor: absent, another dtype, or a view that
    /// reaches past its storage.
    pub fn f32(&self, name: &str) -> Result<HostTensor> {
        let err = |msg: String| ModelError::tensor(&self.path, name, msg);
        let view = (self.tensors.iter().find(|(n, _)| n == name))
            .map(|(_, v)| v)
            .ok_or_else(|| err("no such tensor".into()))?;
        let (width, decode): (usize, fn(&[u8]) -> f32) = match view.storage.kind.as_str() {
            "FloatStorage" => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "HalfStorage" => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            "BFloat16Storage" => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            #[allow(clippy::cast_possible_truncation)]
            "DoubleStorage" => (8, |b| {
                f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32
            }),
            other => return Err(err(format!("storage {other} is not a float dtype"))),
        };
        let entry = format!("{}data/{}", self.root, view.storage.key);
        let bytes = (self.entries.get(&entry))
            .map(|r| &self.map[r.clone()])
            .ok_or_else(|| err(format!("its storage `{entry}` is not in the archive")))?;
        let len = bytes.len() / width;
        let numel = (view.shape.iter())
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| err(format!("shape {:?} is too large", view.shape)))?;
        if numel > 0 {
            let last = (view.shape.iter().zip(&view.stride))
                .try_fold(view.offset, |acc, (&n, &s)| {
                    acc.checked_add((n - 1).checked_mul(s)?)
                });
            if last.is_none_or(|l| l >= len) {
                return Err(err(format!(
                    "the view reaches past its storage of {len} values"
                )));
            }
        }
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; view.shape.len()];
        for _ in 0..numel {
            let at = view.offset
                + idx
                    .iter()
                    .zip(&view.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data.push(decode(&bytes[at * width..(at + 1) * width]));
            // Row-major step of the multi-index.
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < view.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(HostTensor {
            shape: view.shape.clone(),
            data,
        })
    }
}

/// Reads a pickle as data; see the module's doc.
fn unpickle(b: &[u8]) -> std::result::Result<Val, String> {
    let mut stack: Vec<Val> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Val> = HashMap::new();
    // Values a shared container may be copied for (see `spend`): a few per byte of file.
    let mut budget = b.len().saturating_mul(16).max(1 << 20);
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = at.checked_add(n).ok_or("a length past any file")?;
        let s = b.get(*at..end).ok_or("the pickle is cut short")?;
        *at = end;
        Ok(s)
    };
    let uint = |s: &[u8]| s.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    loop {
        let op = take(&mut at, 1)?[0];
        let pop = |stack: &mut Vec<Val>| stack.pop().ok_or("stack underflow".to_string());
        let popmark = |stack: &mut Vec<Val>, marks: &mut Vec<usize>| {
            let m = marks.pop().ok_or("MARK missing")?;
            if m > stack.len() {
                return Err("MARK past the stack".to_string());
            }
            Ok::<_, String>(stack.split_off(m))
        };
        match op {
            0x80 => {
                take(&mut at, 1)?;
            }
            0x95 => {
                take(&mut at, 8)?;
            }
            b'.' => return pop(&mut stack),
            b'(' => marks.push(stack.len()),
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool(true)),
            0x89 => stack.push(Val::Bool(false)),
            b'K' => stack.push(Val::Int(i64::from(take(&mut at, 1)?[0]))),
            b'M' => stack.push(Val::Int(uint(take(&mut at, 2)?) as i64)),
            b'J' => {
                let s = take(&mut at, 4)?;
                stack.push(Val::Int(i64::from(i32::from_le_bytes([
                    s[0], s[1], s[2], s[3],
                ]))));
            }
            0x8a => {
                let n = usize::from(take(&mut at, 1)?[0]);
                let s = take(&mut at, n)?;
                if n > 8 {
                    return Err("an integer wider than 64 bits".into());
                }
                // Two's complement, little-endian, sign-extended.
                let neg = s.last().is_some_and(|&x| x & 0x80 != 0);
                let mut v = uint(s);
                if neg && n < 8 {
                    v |= u64::MAX << (8 * n);
                }
                stack.push(Val::Int(v as i64));
            }
            b'G' => {
                let s = take(&mut at, 8)?;
                stack.push(Val::Float(f64::from_be_bytes(
                    s.try_into().expect("8 bytes"),
                )));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let len = usize::try_from(uint(take(&mut at, n)?)).map_err(|e| e.to_string())?;
                let s = std::str::from_utf8(take(&mut at, len)?).map_err(|e| e.to_string())?;
                stack.push(Val::Str(s.into()));
            }
            b'C' | b'B' => {
                let n = if op == b'C' { 1 } else { 4 };
                let len = usize::try_from(uint(take(&mut at, n)?)).map_err(|e| e.to_string())?;
                stack.push(Val::Bytes(take(&mut at, len)?.into()));
            }
            b'c' => {
                let line = |at: &mut usize| -> std::result::Result<String, String> {
                    let rest = b.get(*at..).unwrap_or_default();
                    let end = rest
                        .iter()
                        .position(|&x| x == b'\n')
                        .ok_or("GLOBAL cut short")?;
                    *at += end + 1;
                    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
                };
                let (module, name) = (line(&mut at)?, line(&mut at)?);
                stack.push(Val::Global(format!("{module}.{name}").into()));
            }
            0x93 => {
                let (name, module) = (pop(&mut stack)?, pop(&mut stack)?);
                let (Val::Str(m), Val::Str(n)) = (module, name) else {
                    return Err("STACK_GLOBAL of non-strings".into());
                };
                stack.push(Val::Global(format!("{m}.{n}").into()));
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => uint(take(&mut at, 1)?),
                    b'r' => uint(take(&mut at, 4)?),
                    _ => memo.len() as u64,
                };
                memo.insert(key, stack.last().ok_or("PUT on an empty stack")?.clone());
            }
            b'h' | b'j' => {
                let key = uint(take(&mut at, if op == b'h' { 1 } else { 4 })?);
                stack.push(
                    memo.get(&key)
                        .ok_or(format!("GET of unknown memo {key}"))?
                        .clone(),
                );
            }
            b')' => stack.push(Val::Tuple(Rc::default(), 1)),
            b']' => stack.push(Val::List(Rc::default(), 1)),
            b'}' => stack.push(Val::Dict(Rc::default(), 1)),
            b't' | 0x85..=0x87 => {
                let items = match op {
                    b't' => popmark(&mut stack, &mut marks)?,
                    _ => {
                        let n = usize::from(op - 0x84);
                        let from = stack.len().checked_sub(n).ok_or("stack underflow")?;
                        stack.split_off(from)
                    }
                };
                let d = deeper(1, &items)?;
                stack.push(Val::Tuple(Rc::new(items), d));
            }
            b'a' | b'e' => {
                let items = match op {
                    b'a' => vec![pop(&mut stack)?],
                    _ => popmark(&mut stack, &mut marks)?,
                };
                let Some(Val::List(list, depth)) = stack.last_mut() else {
                    return Err("APPEND to a non-list".into());
                };
                *depth = deeper(*depth, &items)?;
                spend(&mut budget, list)?;
                Rc::make_mut(list).extend(items);
            }
            b's' | b'u' => {
                let items = match op {
                    b's' => {
                        let v = pop(&mut stack)?;
                        vec![pop(&mut stack)?, v]
                    }
                    _ => popmark(&mut stack, &mut marks)?,
                };
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd count".into());
                }
                let Some(Val::Dict(dict, depth)) = stack.last_mut() else {
                    return Err("SETITEM on a non-dict".into());
                };
                *depth = deeper(*depth, &items)?;
                spend(&mut budget, dict)?;
                let dict = Rc::make_mut(dict);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(storage(&pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(call(&callable, &args)?);
            }
            // BUILD sets an object's state (a state dict's `_metadata`): not needed.
            b'b' => {
                pop(&mut stack)?;
            }
            _ => return Err(format!("opcode 0x{op:02x} at byte {} is not read", at - 1)),
        }
    }
}

/// Charges a container's copy to `budget` when it is about to be copied (it is shared with the
/// memo): a file that re-memoizes a growing list after each append would otherwise cost time
/// quadratic in its size.
fn spend<T>(budget: &mut usize, items: &Rc<Vec<T>>) -> std::result::Result<(), String> {
    if Rc::strong_count(items) > 1 {
        *budget = (budget.checked_sub(items.len()))
            .ok_or("the pickle copies its containers too often")?;
    }
    Ok(())
}

/// A persistent id `('storage', <class>, key, location, numel)`.
fn storage(pid: &Val) -> std::result::Result<Val, String> {
    if let Val::Tuple(t, _) = pid
        && let [Val::Str(tag), Val::Global(class), Val::Str(key), ..] = t.as_slice()
        && &**tag == "storage"
    {
        let kind = class.strip_prefix("torch.").unwrap_or(class);
        return Ok(Val::Storage(Storage {
            kind: kind.to_string(),
            key: key.to_string(),
        }));
    }
    Err(format!(
        "persistent id {} is not a tensor storage",
        pid.describe()
    ))
}

fn size(v: &Val) -> std::result::Result<usize, String> {
    match v {
        Val::Int(i) => usize::try_from(*i).map_err(|_| format!("negative size or stride {i}")),
        other => Err(format!("{} is not a size", other.describe())),
    }
}

fn sizes(v: &Val) -> std::result::Result<Vec<usize>, String> {
    match v {
        Val::Tuple(t, _) => t.iter().map(size).collect(),
        other => Err(format!("{} is not a shape", other.describe())),
    }
}

/// The only callables a tensor dict needs; anything else is refused, never called.
fn call(callable: &Val, args: &Val) -> std::result::Result<Val, String> {
    let Val::Global(name) = callable else {
        return Err(format!("REDUCE of {}", callable.describe()));
    };
    let Val::Tuple(args, _) = args else {
        return Err(format!(
            "{name}: arguments {} are not a tuple",
            args.describe()
        ));
    };
    match (&**name, args.as_slice()) {
        ("collections.OrderedDict", []) => Ok(Val::Dict(Rc::default(), 1)),
        ("torch._utils._rebuild_tensor_v2", [Val::Storage(s), off, shape, stride, ..]) => {
            let (shape, stride) = (sizes(shape)?, sizes(stride)?);
            if shape.len() != stride.len() {
                return Err(format!("shape {shape:?} and stride {stride:?} disagree"));
            }
            Ok(Val::Tensor(Rc::new(View {
                storage: s.clone(),
                offset: size(off)?,
                shape,
                stride,
            })))
        }
        ("torch._utils._rebuild_parameter", [t @ Val::Tensor(_), ..]) => Ok(t.clone()),
        _ => Err(format!(
            "calls `{name}`: only tensors and dicts of them are read from a .bin file"
        )),
    }
}
