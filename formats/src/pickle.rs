//! Restricted unpickler for the `data.pkl` that `torch.save` writes for a state dict.
//!
//! Only the opcodes a state dict needs are understood, and only a fixed allow-list of globals may be
//! referenced; nothing is ever executed. `REDUCE` of an allowed global is interpreted structurally
//! (`OrderedDict()` becomes an empty dict, `_rebuild_tensor_v2(...)` becomes a tensor record).
//! Objects live in an arena so memo references share one object (as in Python) and the memory used
//! is linear in the input size.

use std::collections::HashMap;

use crate::tensor::DType;

/// Longest `data.pkl` accepted (a 70B-parameter state dict's pickle is well under 1 MiB).
pub const MAX_PICKLE_BYTES: usize = 256 << 20;
/// Deepest stack or mark stack accepted.
pub const MAX_STACK: usize = 1 << 20;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 16;

/// Why a pickle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickleError {
    #[error("pickle is {len} bytes, more than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("pickle truncated at byte {offset} (opcode 0x{op:02x} needs {needed} more bytes)")]
    Truncated {
        offset: usize,
        op: u8,
        needed: usize,
    },
    #[error("pickle ends at byte {offset} without a STOP opcode")]
    NoStop { offset: usize },
    #[error("unsupported pickle opcode 0x{op:02x} at byte {offset}")]
    UnknownOpcode { op: u8, offset: usize },
    #[error(
        "unsupported pickle protocol {protocol} at byte {offset} (torch.save writes protocol 2)"
    )]
    BadProtocol { protocol: u8, offset: usize },
    #[error("pickle references global `{module}.{name}` at byte {offset}, which is not allowed in a checkpoint (refusing to execute arbitrary code)")]
    DisallowedGlobal {
        module: String,
        name: String,
        offset: usize,
    },
    #[error("malformed GLOBAL opcode at byte {offset}")]
    BadGlobal { offset: usize },
    #[error("string of {len} bytes at byte {offset} runs past the end of the pickle ({remaining} bytes left)")]
    StringTooLong {
        len: u64,
        remaining: usize,
        offset: usize,
    },
    #[error("invalid UTF-8 string at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("pickle stack underflow at byte {offset} (opcode 0x{op:02x})")]
    StackUnderflow { offset: usize, op: u8 },
    #[error("pickle opcode 0x{op:02x} at byte {offset} needs a MARK but none is set")]
    MissingMark { offset: usize, op: u8 },
    #[error("pickle stack deeper than {max} entries at byte {offset}")]
    StackTooDeep { offset: usize, max: usize },
    #[error("pickle memo id {id} read at byte {offset} was never stored")]
    MissingMemo { id: u32, offset: usize },
    #[error("integer of {len} bytes at byte {offset} does not fit in 64 bits")]
    IntTooLarge { len: usize, offset: usize },
    #[error("pickle opcode at byte {offset}: expected {expected}, found {found}")]
    Type {
        offset: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("torch storage type `torch.{name}` at byte {offset} is not F32, F16 or BF16")]
    UnsupportedStorage { name: String, offset: usize },
    #[error("bad arguments to `{func}` at byte {offset}: {what}")]
    BadCall {
        func: &'static str,
        offset: usize,
        what: String,
    },
    #[error("pickle stops at byte {offset} with {depth} objects on the stack instead of 1")]
    BadFinalStack { offset: usize, depth: usize },
    #[error("the pickled object is not a state dict: {what}")]
    NotStateDict { what: String },
    #[error("state dict key `{key}` appears twice")]
    DuplicateKey { key: String },
}

/// Index of an object in the unpickler's arena.
pub type ObjId = usize;

/// A persistent-id storage reference: `('storage', torch.HalfStorage, key, location, numel)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub dtype: DType,
    /// The storage's entry name under `<prefix>/data/`.
    pub key: String,
    /// Elements (of `dtype`) in the storage.
    pub numel: u64,
}

/// One `torch._utils._rebuild_tensor_v2` call, in elements of the storage dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRecord {
    pub storage: StorageRef,
    pub storage_offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A state-dict entry: name and tensor record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickledTensor {
    pub name: String,
    pub tensor: TensorRecord,
}

/// An unpickled object. Containers hold arena ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<ObjId>),
    List(Vec<ObjId>),
    Dict(Vec<(ObjId, ObjId)>),
    /// An allowed global, not yet called.
    Global(AllowedGlobal),
    Storage(StorageRef),
    Tensor(TensorRecord),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

/// The globals a state-dict pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowedGlobal {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    /// `torch.HalfStorage` etc.
    StorageType(DType),
    /// `torch.float16` etc. (inert values).
    DTypeValue(DType),
}

fn resolve_global(module: &str, name: &str, offset: usize) -> Result<AllowedGlobal, PickleError> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => AllowedGlobal::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => AllowedGlobal::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => AllowedGlobal::RebuildParameter,
        ("torch", "HalfStorage") => AllowedGlobal::StorageType(DType::F16),
        ("torch", "FloatStorage") => AllowedGlobal::StorageType(DType::F32),
        ("torch", "BFloat16Storage") => AllowedGlobal::StorageType(DType::BF16),
        ("torch", "float16") | ("torch", "half") => AllowedGlobal::DTypeValue(DType::F16),
        ("torch", "float32") | ("torch", "float") => AllowedGlobal::DTypeValue(DType::F32),
        ("torch", "bfloat16") => AllowedGlobal::DTypeValue(DType::BF16),
        ("torch", n) if n.ends_with("Storage") => {
            return Err(PickleError::UnsupportedStorage {
                name: n.to_string(),
                offset,
            })
        }
        _ => {
            return Err(PickleError::DisallowedGlobal {
                module: module.to_string(),
                name: name.to_string(),
                offset,
            })
        }
    };
    Ok(g)
}

/// The result of unpickling: an arena of objects and the root.
#[derive(Debug)]
pub struct Unpickled {
    objs: Vec<Obj>,
    root: ObjId,
}

impl Unpickled {
    /// The root object.
    pub fn root(&self) -> &Obj {
        self.get(self.root)
    }

    /// An object by id (ids come from containers of this arena).
    pub fn get(&self, id: ObjId) -> &Obj {
        // Ids are only created by the unpickler and always index the arena; None is a safe fallback.
        self.objs.get(id).unwrap_or(&Obj::None)
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    op: u8,
    op_pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(PickleError::Truncated {
                offset: self.op_pos,
                op: self.op,
                needed: n.saturating_sub(self.data.len().saturating_sub(self.pos)),
            }),
        }
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .ok_or(PickleError::BadGlobal {
                offset: self.op_pos,
            })?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| PickleError::InvalidUtf8 { offset: self.pos })?;
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, len: u64) -> Result<String, PickleError> {
        let remaining = self.data.len() - self.pos;
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= remaining)
            .ok_or(PickleError::StringTooLong {
                len,
                remaining,
                offset: self.op_pos,
            })?;
        let start = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| PickleError::InvalidUtf8 { offset: start })
    }
}

struct Machine {
    objs: Vec<Obj>,
    stack: Vec<ObjId>,
    marks: Vec<usize>,
    memo: HashMap<u32, ObjId>,
}

impl Machine {
    fn push(&mut self, o: Obj, offset: usize) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::StackTooDeep {
                offset,
                max: MAX_STACK,
            });
        }
        self.objs.push(o);
        self.stack.push(self.objs.len() - 1);
        Ok(())
    }
    fn push_id(&mut self, id: ObjId, offset: usize) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::StackTooDeep {
                offset,
                max: MAX_STACK,
            });
        }
        self.stack.push(id);
        Ok(())
    }
    fn pop(&mut self, r: &Reader) -> Result<ObjId, PickleError> {
        // Never pop below the innermost mark.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleError::StackUnderflow {
                offset: r.op_pos,
                op: r.op,
            });
        }
        self.stack.pop().ok_or(PickleError::StackUnderflow {
            offset: r.op_pos,
            op: r.op,
        })
    }
    fn top(&self, r: &Reader) -> Result<ObjId, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleError::StackUnderflow {
                offset: r.op_pos,
                op: r.op,
            });
        }
        self.stack
            .last()
            .copied()
            .ok_or(PickleError::StackUnderflow {
                offset: r.op_pos,
                op: r.op,
            })
    }
    fn pop_mark(&mut self, r: &Reader) -> Result<Vec<ObjId>, PickleError> {
        let m = self.marks.pop().ok_or(PickleError::MissingMark {
            offset: r.op_pos,
            op: r.op,
        })?;
        if m > self.stack.len() {
            return Err(PickleError::StackUnderflow {
                offset: r.op_pos,
                op: r.op,
            });
        }
        Ok(self.stack.split_off(m))
    }
    fn obj(&self, id: ObjId) -> &Obj {
        self.objs.get(id).unwrap_or(&Obj::None)
    }
    fn type_err(&self, r: &Reader, expected: &'static str, id: ObjId) -> PickleError {
        PickleError::Type {
            offset: r.op_pos,
            expected,
            found: self.obj(id).kind(),
        }
    }
    fn set_items(&mut self, r: &Reader, dict: ObjId, items: Vec<ObjId>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(PickleError::StackUnderflow {
                offset: r.op_pos,
                op: r.op,
            });
        }
        let pairs = items.chunks_exact(2).map(|c| (c[0], c[1]));
        match self.objs.get_mut(dict) {
            Some(Obj::Dict(d)) => {
                d.extend(pairs);
                Ok(())
            }
            _ => Err(self.type_err(r, "dict", dict)),
        }
    }
    fn append(&mut self, r: &Reader, list: ObjId, items: Vec<ObjId>) -> Result<(), PickleError> {
        match self.objs.get_mut(list) {
            Some(Obj::List(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(self.type_err(r, "list", list)),
        }
    }

    fn int(
        &self,
        r: &Reader,
        id: ObjId,
        func: &'static str,
        what: &str,
    ) -> Result<u64, PickleError> {
        match self.obj(id) {
            Obj::Int(v) if *v >= 0 => Ok(*v as u64),
            o => Err(PickleError::BadCall {
                func,
                offset: r.op_pos,
                what: match o {
                    Obj::Int(v) => format!("{what} must be non-negative, found {v}"),
                    o => format!("{what} must be a non-negative int, found {}", o.kind()),
                },
            }),
        }
    }

    fn int_tuple(
        &self,
        r: &Reader,
        id: ObjId,
        func: &'static str,
        what: &str,
    ) -> Result<Vec<u64>, PickleError> {
        let items = match self.obj(id) {
            Obj::Tuple(t) => t,
            o => {
                return Err(PickleError::BadCall {
                    func,
                    offset: r.op_pos,
                    what: format!("{what} must be a tuple, found {}", o.kind()),
                })
            }
        };
        if items.len() > MAX_DIMS {
            return Err(PickleError::BadCall {
                func,
                offset: r.op_pos,
                what: format!("{what} has {} dimensions (max {MAX_DIMS})", items.len()),
            });
        }
        items.iter().map(|&i| self.int(r, i, func, what)).collect()
    }

    /// Interprets `callable(*args)` for an allowed callable.
    fn reduce(&mut self, r: &Reader, func: ObjId, args: ObjId) -> Result<Obj, PickleError> {
        let g = match self.obj(func) {
            Obj::Global(g) => *g,
            _ => return Err(self.type_err(r, "an allowed global to call", func)),
        };
        let args: Vec<ObjId> = match self.obj(args) {
            Obj::Tuple(t) => t.clone(),
            _ => return Err(self.type_err(r, "an argument tuple", args)),
        };
        match g {
            AllowedGlobal::OrderedDict => {
                if !args.is_empty() {
                    return Err(PickleError::BadCall {
                        func: "collections.OrderedDict",
                        offset: r.op_pos,
                        what: format!("expected no arguments, got {}", args.len()),
                    });
                }
                Ok(Obj::Dict(Vec::new()))
            }
            AllowedGlobal::RebuildTensorV2 => {
                const F: &str = "torch._utils._rebuild_tensor_v2";
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if !(6..=7).contains(&args.len()) {
                    return Err(PickleError::BadCall {
                        func: F,
                        offset: r.op_pos,
                        what: format!("expected 6 or 7 arguments, got {}", args.len()),
                    });
                }
                let storage = match self.obj(args[0]) {
                    Obj::Storage(s) => s.clone(),
                    o => {
                        return Err(PickleError::BadCall {
                            func: F,
                            offset: r.op_pos,
                            what: format!("argument 1 must be a storage, found {}", o.kind()),
                        })
                    }
                };
                let storage_offset = self.int(r, args[1], F, "storage_offset")?;
                let shape = self.int_tuple(r, args[2], F, "size")?;
                let stride = self.int_tuple(r, args[3], F, "stride")?;
                if shape.len() != stride.len() {
                    return Err(PickleError::BadCall {
                        func: F,
                        offset: r.op_pos,
                        what: format!(
                            "size has {} dimensions but stride has {}",
                            shape.len(),
                            stride.len()
                        ),
                    });
                }
                Ok(Obj::Tensor(TensorRecord {
                    storage,
                    storage_offset,
                    shape,
                    stride,
                }))
            }
            AllowedGlobal::RebuildParameter => {
                const F: &str = "torch._utils._rebuild_parameter";
                // (data, requires_grad, backward_hooks)
                match args.first().map(|&a| self.obj(a)) {
                    Some(Obj::Tensor(t)) if args.len() == 3 => Ok(Obj::Tensor(t.clone())),
                    _ => Err(PickleError::BadCall {
                        func: F,
                        offset: r.op_pos,
                        what: "expected (tensor, requires_grad, backward_hooks)".to_string(),
                    }),
                }
            }
            AllowedGlobal::StorageType(_) | AllowedGlobal::DTypeValue(_) => {
                Err(PickleError::BadCall {
                    func: "torch storage/dtype",
                    offset: r.op_pos,
                    what: "storage types and dtypes cannot be called".to_string(),
                })
            }
        }
    }

    /// Interprets a persistent id `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&self, r: &Reader, pid: ObjId) -> Result<Obj, PickleError> {
        const F: &str = "persistent_load";
        let bad = |what: &str| PickleError::BadCall {
            func: F,
            offset: r.op_pos,
            what: what.to_string(),
        };
        let t = match self.obj(pid) {
            Obj::Tuple(t) if t.len() == 5 => t,
            _ => return Err(bad("expected ('storage', type, key, location, numel)")),
        };
        match self.obj(t[0]) {
            Obj::Str(s) if s == "storage" => {}
            _ => return Err(bad("first element must be 'storage'")),
        }
        let dtype = match self.obj(t[1]) {
            Obj::Global(AllowedGlobal::StorageType(d)) => *d,
            _ => return Err(bad("second element must be a torch storage type")),
        };
        let key = match self.obj(t[2]) {
            Obj::Str(s) => s.clone(),
            _ => return Err(bad("storage key must be a str")),
        };
        if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
            return Err(bad("storage key must be a plain entry name"));
        }
        let numel = self.int(r, t[4], F, "numel")?;
        Ok(Obj::Storage(StorageRef { dtype, key, numel }))
    }
}

mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const GLOBAL: u8 = b'c';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const EMPTY_LIST: u8 = b']';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const BUILD: u8 = b'b';
    pub const BINFLOAT: u8 = b'G';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
}

/// Runs the restricted unpickler over `data`.
pub fn unpickle(data: &[u8]) -> Result<Unpickled, PickleError> {
    if data.len() > MAX_PICKLE_BYTES {
        return Err(PickleError::TooLarge {
            len: data.len(),
            max: MAX_PICKLE_BYTES,
        });
    }
    let mut r = Reader {
        data,
        pos: 0,
        op: 0,
        op_pos: 0,
    };
    let mut m = Machine {
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        if r.pos >= data.len() {
            return Err(PickleError::NoStop { offset: r.pos });
        }
        r.op_pos = r.pos;
        r.op = 0;
        let opc = r.u8()?;
        r.op = opc;
        let at = r.op_pos;
        match opc {
            op::PROTO => {
                let p = r.u8()?;
                if !(2..=5).contains(&p) {
                    return Err(PickleError::BadProtocol {
                        protocol: p,
                        offset: at,
                    });
                }
            }
            op::STOP => {
                if m.stack.len() != 1 || !m.marks.is_empty() {
                    return Err(PickleError::BadFinalStack {
                        offset: at,
                        depth: m.stack.len(),
                    });
                }
                let root = m.stack[0];
                return Ok(Unpickled { objs: m.objs, root });
            }
            op::GLOBAL => {
                let module = r.line()?;
                let name = r.line()?;
                let g = resolve_global(module, name, at)?;
                m.push(Obj::Global(g), at)?;
            }
            op::BINPUT | op::LONG_BINPUT => {
                let id = if opc == op::BINPUT {
                    u32::from(r.u8()?)
                } else {
                    r.u32()?
                };
                let top = m.top(&r)?;
                m.memo.insert(id, top);
            }
            op::BINGET | op::LONG_BINGET => {
                let id = if opc == op::BINGET {
                    u32::from(r.u8()?)
                } else {
                    r.u32()?
                };
                let obj = *m
                    .memo
                    .get(&id)
                    .ok_or(PickleError::MissingMemo { id, offset: at })?;
                m.push_id(obj, at)?;
            }
            op::EMPTY_DICT => m.push(Obj::Dict(Vec::new()), at)?,
            op::EMPTY_TUPLE => m.push(Obj::Tuple(Vec::new()), at)?,
            op::EMPTY_LIST => m.push(Obj::List(Vec::new()), at)?,
            op::MARK => {
                if m.marks.len() >= MAX_STACK {
                    return Err(PickleError::StackTooDeep {
                        offset: at,
                        max: MAX_STACK,
                    });
                }
                m.marks.push(m.stack.len());
            }
            op::TUPLE => {
                let items = m.pop_mark(&r)?;
                m.push(Obj::Tuple(items), at)?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(opc - op::TUPLE1) + 1;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(m.pop(&r)?);
                }
                items.reverse();
                m.push(Obj::Tuple(items), at)?;
            }
            op::BINUNICODE => {
                let len = r.u32()?;
                let s = r.string(u64::from(len))?;
                m.push(Obj::Str(s), at)?;
            }
            op::SHORT_BINUNICODE => {
                let len = r.u8()?;
                let s = r.string(u64::from(len))?;
                m.push(Obj::Str(s), at)?;
            }
            op::BININT => {
                let v = r.u32()? as i32;
                m.push(Obj::Int(i64::from(v)), at)?;
            }
            op::BININT1 => {
                let v = r.u8()?;
                m.push(Obj::Int(i64::from(v)), at)?;
            }
            op::BININT2 => {
                let v = r.u16()?;
                m.push(Obj::Int(i64::from(v)), at)?;
            }
            op::LONG1 => {
                let n = usize::from(r.u8()?);
                let b = r.take(n)?;
                if n > 8 {
                    return Err(PickleError::IntTooLarge { len: n, offset: at });
                }
                let v = if n == 0 {
                    0
                } else {
                    // Two's complement little-endian, sign-extended from the top byte.
                    let fill = if b[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                    let mut buf = [fill; 8];
                    buf[..n].copy_from_slice(b);
                    i64::from_le_bytes(buf)
                };
                m.push(Obj::Int(v), at)?;
            }
            op::NEWTRUE => m.push(Obj::Bool(true), at)?,
            op::NEWFALSE => m.push(Obj::Bool(false), at)?,
            op::NONE => m.push(Obj::None, at)?,
            op::BINFLOAT => {
                let b = r.take(8)?;
                let mut buf = [0u8; 8];
                buf.copy_from_slice(b);
                m.push(Obj::Float(f64::from_be_bytes(buf)), at)?;
            }
            op::BINPERSID => {
                let pid = m.pop(&r)?;
                let o = m.persistent_load(&r, pid)?;
                m.push(o, at)?;
            }
            op::REDUCE => {
                let args = m.pop(&r)?;
                let func = m.pop(&r)?;
                let o = m.reduce(&r, func, args)?;
                m.push(o, at)?;
            }
            op::SETITEM => {
                let v = m.pop(&r)?;
                let k = m.pop(&r)?;
                let d = m.top(&r)?;
                m.set_items(&r, d, vec![k, v])?;
            }
            op::SETITEMS => {
                let items = m.pop_mark(&r)?;
                let d = m.top(&r)?;
                m.set_items(&r, d, items)?;
            }
            op::APPEND => {
                let v = m.pop(&r)?;
                let l = m.top(&r)?;
                m.append(&r, l, vec![v])?;
            }
            op::APPENDS => {
                let items = m.pop_mark(&r)?;
                let l = m.top(&r)?;
                m.append(&r, l, items)?;
            }
            op::BUILD => {
                // `obj.__setstate__(state)`: only dicts (an OrderedDict's `_metadata`) and
                // tensors (empty state) are accepted; the state is dropped, nothing runs.
                let state = m.pop(&r)?;
                let target = m.top(&r)?;
                match m.obj(target) {
                    Obj::Dict(_) | Obj::Tensor(_) => {}
                    _ => return Err(m.type_err(&r, "a dict or tensor to BUILD", target)),
                }
                let _ = state;
            }
            op::POP => {
                m.pop(&r)?;
            }
            op::POP_MARK => {
                m.pop_mark(&r)?;
            }
            op::DUP => {
                let t = m.top(&r)?;
                m.push_id(t, at)?;
            }
            _ => {
                return Err(PickleError::UnknownOpcode {
                    op: opc,
                    offset: at,
                })
            }
        }
    }
}

/// Unpickles a `torch.save`d state dict: a (possibly ordered) dict of name -> tensor, in pickle order.
pub fn load_state_dict(data: &[u8]) -> Result<Vec<PickledTensor>, PickleError> {
    let u = unpickle(data)?;
    let items = match u.root() {
        Obj::Dict(items) => items,
        o => {
            return Err(PickleError::NotStateDict {
                what: format!("top-level object is a {}, not a dict", o.kind()),
            })
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let name = match u.get(k) {
            Obj::Str(s) => s.clone(),
            o => {
                return Err(PickleError::NotStateDict {
                    what: format!("a key is a {}, not a str", o.kind()),
                })
            }
        };
        let tensor = match u.get(v) {
            Obj::Tensor(t) => t.clone(),
            o => {
                return Err(PickleError::NotStateDict {
                    what: format!("value of `{name}` is a {}, not a tensor", o.kind()),
                })
            }
        };
        if !seen.insert(name.clone()) {
            return Err(PickleError::DuplicateKey { key: name });
        }
        out.push(PickledTensor { name, tensor });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (name, storage type, key, numel, storage offset, shape, stride)
    pub(crate) type TestEntry<'a> = (&'a str, &'a str, &'a str, u32, u32, &'a [u32], &'a [u32]);

    /// Builds a protocol-2 pickle of `{name: _rebuild_tensor_v2(storage, off, shape, stride, False, OrderedDict())}`
    /// the way torch.save lays it out.
    pub(crate) fn tensor_pickle(entries: &[TestEntry]) -> Vec<u8> {
        // entries: (name, storage type, key, numel, offset, shape, stride)
        let mut p = vec![0x80, 2, b'}', b'('];
        for (name, st, key, numel, off, shape, stride) in entries {
            push_str(&mut p, name);
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
            p.extend_from_slice(b"((");
            push_str(&mut p, "storage");
            p.extend_from_slice(format!("ctorch\n{st}\n").as_bytes());
            push_str(&mut p, key);
            push_str(&mut p, "cpu");
            push_int(&mut p, *numel);
            p.extend_from_slice(b"tQ");
            push_int(&mut p, *off);
            p.push(b'(');
            for &d in *shape {
                push_int(&mut p, d);
            }
            p.push(b't');
            p.push(b'(');
            for &s in *stride {
                push_int(&mut p, s);
            }
            p.push(b't');
            p.push(op::NEWFALSE);
            p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
            p.extend_from_slice(b"tR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    pub(crate) fn push_str(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn push_int(p: &mut Vec<u8>, v: u32) {
        if v <= i32::MAX as u32 {
            p.push(b'J');
            p.extend_from_slice(&v.to_le_bytes());
        } else {
            // LONG1 with a zero sign byte, as Python writes ints >= 2**31.
            p.extend_from_slice(&[op::LONG1, 5]);
            p.extend_from_slice(&v.to_le_bytes());
            p.push(0);
        }
    }

    fn small() -> Vec<u8> {
        tensor_pickle(&[("w", "HalfStorage", "0", 6, 0, &[2, 3], &[3, 1])])
    }

    #[test]
    fn parses_small_state_dict() {
        let sd = load_state_dict(&small()).unwrap();
        assert_eq!(sd.len(), 1);
        assert_eq!(sd[0].name, "w");
        assert_eq!(sd[0].tensor.storage.dtype, DType::F16);
        assert_eq!(sd[0].tensor.storage.key, "0");
        assert_eq!(sd[0].tensor.storage.numel, 6);
        assert_eq!(sd[0].tensor.shape, vec![2, 3]);
        assert_eq!(sd[0].tensor.stride, vec![3, 1]);
    }

    fn global_pickle(module: &str, name: &str) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(format!("c{module}\n{name}\n").as_bytes());
        push_str(&mut p, "echo pwned");
        p.extend_from_slice(&[op::TUPLE1, b'R', b'.']);
        p
    }

    #[test]
    fn rejects_dangerous_globals() {
        for (m, n) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("posix", "system"),
            ("subprocess", "Popen"),
            ("__builtin__", "exec"),
            ("torch", "load"),
        ] {
            let e = unpickle(&global_pickle(m, n)).unwrap_err();
            assert_eq!(
                e,
                PickleError::DisallowedGlobal {
                    module: m.into(),
                    name: n.into(),
                    offset: 2
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{m}.{n}")), "{msg}");
        }
    }

    #[test]
    fn rejects_unsupported_storage_type() {
        let p = tensor_pickle(&[("w", "LongStorage", "0", 6, 0, &[6], &[1])]);
        assert!(matches!(
            unpickle(&p),
            Err(PickleError::UnsupportedStorage { .. })
        ));
    }

    #[test]
    fn rejects_unknown_opcode() {
        // INST ('i') is never emitted by torch.save and can call arbitrary classes.
        let e = unpickle(b"\x80\x02ios\nsystem\n.").unwrap_err();
        assert!(matches!(
            e,
            PickleError::UnknownOpcode {
                op: b'i',
                offset: 2
            }
        ));
        assert!(matches!(
            unpickle(&[0x80, 2, 0xff]),
            Err(PickleError::UnknownOpcode { op: 0xff, .. })
        ));
    }

    #[test]
    fn truncated_at_every_byte() {
        let p = small();
        for n in 0..p.len() {
            assert!(unpickle(&p[..n]).is_err(), "prefix of {n} bytes accepted");
        }
    }

    #[test]
    fn huge_string_length() {
        let mut p = vec![0x80, 2, b'X'];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(b"abc.");
        assert!(matches!(
            unpickle(&p),
            Err(PickleError::StringTooLong { len, .. }) if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn missing_memo() {
        assert_eq!(
            unpickle(b"\x80\x02h\x07.").unwrap_err(),
            PickleError::MissingMemo { id: 7, offset: 2 }
        );
        assert!(matches!(
            unpickle(b"\x80\x02j\xff\xff\xff\x00."),
            Err(PickleError::MissingMemo { .. })
        ));
    }

    #[test]
    fn stack_underflow() {
        assert!(matches!(
            unpickle(b"\x80\x02\x86."),
            Err(PickleError::StackUnderflow { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02R."),
            Err(PickleError::StackUnderflow { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02q\x00."),
            Err(PickleError::StackUnderflow { .. })
        ));
        // Popping across a mark is an underflow too.
        assert!(matches!(
            unpickle(b"\x80\x02N(s."),
            Err(PickleError::StackUnderflow { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02t."),
            Err(PickleError::MissingMark { .. })
        ));
    }

    #[test]
    fn no_stop_and_bad_final_stack() {
        assert!(matches!(
            unpickle(b"\x80\x02}"),
            Err(PickleError::NoStop { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02}}."),
            Err(PickleError::BadFinalStack { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02."),
            Err(PickleError::BadFinalStack { .. })
        ));
    }

    #[test]
    fn rejects_calls_of_non_callables() {
        // Calling a dict, or a storage type.
        assert!(matches!(
            unpickle(b"\x80\x02})R."),
            Err(PickleError::Type { .. })
        ));
        assert!(matches!(
            unpickle(b"\x80\x02ctorch\nHalfStorage\n)R."),
            Err(PickleError::BadCall { .. })
        ));
        // OrderedDict with arguments.
        assert!(matches!(
            unpickle(b"\x80\x02ccollections\nOrderedDict\nN\x85R."),
            Err(PickleError::BadCall { .. })
        ));
    }

    #[test]
    fn long1_and_negative_ints() {
        let u = unpickle(b"\x80\x02\x8a\x02\xff\x7f.").unwrap();
        assert_eq!(u.root(), &Obj::Int(0x7fff));
        let u = unpickle(b"\x80\x02\x8a\x01\xff.").unwrap();
        assert_eq!(u.root(), &Obj::Int(-1));
        assert!(matches!(
            unpickle(b"\x80\x02\x8a\x09\x01\x01\x01\x01\x01\x01\x01\x01\x01."),
            Err(PickleError::IntTooLarge { .. })
        ));
        // A negative shape is refused.
        let mut p = vec![0x80, 2, b'}'];
        push_str(&mut p, "w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        push_str(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        push_str(&mut p, "0");
        push_str(&mut p, "cpu");
        push_int(&mut p, 4);
        p.extend_from_slice(b"tQK\x00J\xff\xff\xff\xff\x85K\x01\x85\x89)tRs.");
        assert!(matches!(
            load_state_dict(&p),
            Err(PickleError::BadCall { .. })
        ));
    }

    #[test]
    fn not_a_state_dict() {
        assert!(matches!(
            load_state_dict(b"\x80\x02]."),
            Err(PickleError::NotStateDict { .. })
        ));
        let mut p = vec![0x80, 2, b'}'];
        push_str(&mut p, "x");
        p.extend_from_slice(b"Ns.");
        assert!(matches!(
            load_state_dict(&p),
            Err(PickleError::NotStateDict { .. })
        ));
    }

    #[test]
    fn duplicate_key() {
        let p = tensor_pickle(&[
            ("w", "HalfStorage", "0", 6, 0, &[6], &[1]),
            ("w", "HalfStorage", "1", 6, 0, &[6], &[1]),
        ]);
        assert!(matches!(
            load_state_dict(&p),
            Err(PickleError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn memo_shares_objects_and_self_reference_terminates() {
        // A list appended to itself (cycle) must not hang or blow up.
        let u = unpickle(b"\x80\x02]q\x00h\x00a.").unwrap();
        assert!(matches!(u.root(), Obj::List(l) if l.len() == 1));
        // Exponential BINGET/TUPLE2 doubling stays linear in memory.
        let mut p = vec![0x80, 2, b'N', b'q', 0, b'0'];
        for _ in 0..200 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x000");
        }
        p.extend_from_slice(b"h\x00.");
        assert!(matches!(unpickle(&p).unwrap().root(), Obj::Tuple(_)));
    }

    #[test]
    fn rebuild_parameter_and_build() {
        // _rebuild_parameter(tensor, False, OrderedDict()) and BUILD on an OrderedDict.
        let inner = tensor_pickle(&[("w", "FloatStorage", "0", 4, 0, &[4], &[1])]);
        // Extract the tensor expression: between "X\x01\0\0\0w" and "u." of the dict.
        let start = 2 + 2 + 5 + 1; // PROTO, '}', '(', X + len + 'w'
        let expr = &inner[start..inner.len() - 2];
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
        push_str(&mut p, "w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_parameter\n(");
        p.extend_from_slice(expr);
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRu}b.");
        let sd = load_state_dict(&p).unwrap();
        assert_eq!(sd[0].tensor.storage.dtype, DType::F32);
        assert_eq!(sd[0].tensor.shape, vec![4]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = unpickle(&data);
            let _ = load_state_dict(&data);
        }

        #[test]
        fn mutated_valid_pickle_never_panics(idx in 0usize..400, byte in any::<u8>()) {
            let mut p = small();
            let i = idx % p.len();
            p[i] = byte;
            let _ = load_state_dict(&p);
        }
    }
}
