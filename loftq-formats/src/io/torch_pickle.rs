//! PyTorch `.bin` state dicts (`torch.save` of a dict of tensors, e.g. PEFT's
//! `adapter_model.bin` with `safe_serialization=False`): the zip archive and a restricted
//! reading of its pickle.
//!
//! The pickle is not run: it is read as data by a small machine that knows the opcodes
//! `torch.save` emits and only the callables a tensor dict needs (`OrderedDict`,
//! `_rebuild_tensor_v2`, `_rebuild_parameter`). Any other global, `os.system` included, is an
//! error. Tensor data stays in the memory-mapped file until a tensor is asked for.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::Dtype;

use super::pickle::{Val, View, unpickle};
use super::safetensors::{HostTensor, floats_from_le};
use super::torch_zip::{Entries, entries};
use crate::{ModelError, Result};

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
        let dtype = match view.storage.kind.as_str() {
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "DoubleStorage" => Dtype::F64,
            other => return Err(err(format!("storage {other} is not a float dtype"))),
        };
        let width = dtype.bitsize() / 8;
        let entry = format!("{}data/{}", self.root, view.storage.key);
        let bytes = (self.entries.get(&entry))
            .map(|r| &self.map[r.clone()])
            .ok_or_else(|| err(format!("its storage `{entry}` is not in the archive")))?;
        let len = bytes.len() / width;
        let numel = (view.shape.iter())
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(|| err(format!("shape {:?} is too large", view.shape)))?;
        if numel == 0 {
            return Ok(HostTensor {
                shape: view.shape.clone(),
                data: Vec::new(),
            });
        }
        let last = (view.shape.iter().zip(&view.stride))
            .try_fold(view.offset, |acc, (&n, &s)| {
                acc.checked_add((n - 1).checked_mul(s)?)
            })
            .filter(|&l| l < len)
            .ok_or_else(|| err(format!("the view reaches past its storage of {len} values")))?;
        // The values the view spans, decoded once; a row-major view is all of them.
        let span = floats_from_le(dtype, &bytes[view.offset * width..(last + 1) * width])
            .expect("a float dtype");
        let mut row_major = 1;
        let mut contiguous = true;
        for (&n, &s) in view.shape.iter().zip(&view.stride).rev() {
            contiguous &= n == 1 || s == row_major;
            row_major *= n;
        }
        let data = match contiguous {
            true => span,
            false => {
                let mut data = Vec::with_capacity(numel);
                let mut idx = vec![0usize; view.shape.len()];
                for _ in 0..numel {
                    let at: usize = idx.iter().zip(&view.stride).map(|(i, s)| i * s).sum();
                    data.push(span[at]);
                    // Row-major step of the multi-index.
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < view.shape[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
                data
            }
        };
        Ok(HostTensor {
            shape: view.shape.clone(),
            data,
        })
    }
}
