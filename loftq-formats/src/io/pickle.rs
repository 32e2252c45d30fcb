//! A restricted reading of Python's pickle, for `torch.save` files (see
//! [`super::torch_pickle`]): the opcodes `torch.save` emits, values as data, and only the
//! callables a dict of tensors needs.

use std::collections::HashMap;
use std::rc::Rc;

/// A tensor of the dict: where its values lie in which storage.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct View {
    pub(super) storage: Storage,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Storage {
    /// The storage class, e.g. `FloatStorage`.
    pub(super) kind: String,
    /// Its entry `data/<key>` in the archive.
    pub(super) key: String,
}

/// A value of the pickle. Containers carry how deeply they nest (a state dict nests 3 deep),
/// so that a hostile file cannot build one deep enough to overflow the stack when dropped.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Val {
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
    pub(super) fn describe(&self) -> String {
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

/// Reads a pickle as data; see the module's doc.
pub(super) fn unpickle(b: &[u8]) -> std::result::Result<Val, String> {
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
