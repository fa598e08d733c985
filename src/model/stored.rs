//! Weight matrices as stored and scored: dense `f32`, `int8` with one scale
//! per output row, `int4` packed two per byte with one scale per group of a
//! row, sparse rows (CSR with 16-bit column indices, `f32` or `int8`
//! values), and low-rank factor pairs — each scheme composable with the
//! others where it makes sense (`lowrank` factors may be quantized, sparse
//! values may be `int8`).
//!
//! Every matrix is output-major, as `torch.nn.Linear` stores it: row `j`
//! holds the weights of output `j`, so the product is always
//! `out[i, j] = Σ_k x[i, k] · M[j, k]` — a user's hidden state against the
//! item table, or a layer's input against its weights. The integer schemes
//! compute it on the stored integers (the input row is quantized to `int8`
//! on the fly and integer dot products accumulate in `i32`); nothing is
//! expanded to `f32` at load time.
//!
//! [`Matrix::encode`] writes a matrix as safetensors tensors under a name
//! prefix and describes it by a [`Layout`] (kept in the file's metadata);
//! [`Matrix::decode`] rebuilds it from a layout and the file's tensors,
//! refusing anything inconsistent: wrong dtypes or shapes, sizes that do
//! not multiply out, unsorted or out-of-range sparse indices, non-finite
//! values, negative scales.

use std::collections::HashMap;

use half::f16;
use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::sasrec::kernels::{View, matmul};

/// Largest int8 magnitude used (±127: −128 is never produced, so the
/// `maddubs` kernel cannot saturate).
const I8_MAX: f32 = 127.0;
/// Largest int4 magnitude used (±7).
const I4_MAX: f32 = 7.0;
/// Adding and subtracting 1.5 · 2²³ rounds an `f32` below 2²² to the nearest integer.
const ROUNDER: f32 = 12_582_912.0;
/// Products below this many multiply–adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 17;

/// How a matrix is stored: the scheme and its sizes, recursively for
/// low-rank factors. Kept in the artifact's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Layout {
    /// Dense `f32`.
    F32 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
    },
    /// `int8` values, one `f16` scale per row.
    Int8 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
    },
    /// `int4` values packed two per byte, one `f16` scale per `group` values of a row.
    Int4 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values sharing a scale.
        group: usize,
    },
    /// Compressed sparse rows: the kept values of each row and their columns.
    Sparse {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values kept.
        nnz: usize,
        /// `f32` values, or `int8` with one scale per row.
        int8: bool,
    },
    /// `M ≈ U · V` with `U` rows × rank and `V` rank × cols.
    LowRank {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Inner dimension.
        rank: usize,
        /// The left factor's layout.
        u: Box<Layout>,
        /// The right factor's layout.
        v: Box<Layout>,
    },
}

impl Layout {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Layout::F32 { rows, cols }
            | Layout::Int8 { rows, cols }
            | Layout::Int4 { rows, cols, .. }
            | Layout::Sparse { rows, cols, .. }
            | Layout::LowRank { rows, cols, .. } => (rows, cols),
        }
    }

    /// The scheme's name as `inspect` prints it (`lowrank(int8·int8)`).
    pub fn scheme(&self) -> String {
        match self {
            Layout::F32 { .. } => "f32".into(),
            Layout::Int8 { .. } => "int8-row".into(),
            Layout::Int4 { group, .. } => format!("int4-g{group}"),
            Layout::Sparse { int8: false, .. } => "sparse-f32".into(),
            Layout::Sparse { int8: true, .. } => "sparse-int8".into(),
            Layout::LowRank { rank, u, v, .. } => {
                format!("lowrank-r{rank}({}·{})", u.scheme(), v.scheme())
            }
        }
    }
}

/// The values of a sparse matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseValues {
    /// As trained.
    F32(Vec<f32>),
    /// `int8`, one scale per row.
    Int8 {
        /// Quantized values, in the order of the column indices.
        q: Vec<i8>,
        /// Per row.
        scale: Vec<f32>,
    },
}

/// An output-major weight matrix in one of the stored schemes.
#[derive(Debug, Clone, PartialEq)]
pub enum Matrix {
    /// Dense `rows × cols`.
    F32 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Row-major values.
        data: Vec<f32>,
    },
    /// `int8` with a scale per row: `M[j, k] = scale[j] · q[j, k]`.
    Int8 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Row-major quantized values.
        q: Vec<i8>,
        /// Per row.
        scale: Vec<f32>,
    },
    /// `int4` in `[-8, 7]`, stored as `q + 8`, low nibble first; each row
    /// padded to whole bytes; a scale per group of `group` values.
    Int4 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values per scale.
        group: usize,
        /// `rows × ⌈cols / 2⌉` bytes.
        packed: Vec<u8>,
        /// `rows × ⌈cols / group⌉` scales.
        scale: Vec<f32>,
    },
    /// Compressed sparse rows.
    Sparse {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// `rows + 1` offsets into `indices` and the values.
        indptr: Vec<u32>,
        /// Column of each kept value, increasing within a row.
        indices: Vec<u16>,
        /// The kept values.
        values: SparseValues,
    },
    /// `U · V`.
    LowRank {
        /// `rows × rank`.
        u: Box<Matrix>,
        /// `rank × cols`.
        v: Box<Matrix>,
    },
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub type Encoded = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rounds a positive scale up to the next `f16` (so `|x| / scale` never
/// exceeds the integer range once the scale is stored as `f16`).
fn f16_scale(max_abs: f32, levels: f32) -> f32 {
    if max_abs <= 0.0 || !max_abs.is_finite() {
        return 0.0;
    }
    let s = max_abs / levels;
    let mut h = f16::from_f32(s);
    if h.to_f32() < s {
        h = f16::from_bits(h.to_bits() + 1);
    }
    h.to_f32()
}

/// Quantizes `values` symmetrically to `±levels` into `out` with one scale
/// (max |v| / levels, rounded up to `f16`), which it returns.
fn quantize_span(values: &[f32], levels: f32, out: &mut [i8]) -> f32 {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = f16_scale(max, levels);
    for (o, &v) in out.iter_mut().zip(values) {
        *o = if scale == 0.0 {
            0
        } else {
            (v / scale).round().clamp(-levels, levels) as i8
        };
    }
    scale
}

impl Matrix {
    /// A dense matrix from row-major values.
    pub fn dense(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "dense matrix size");
        Matrix::F32 { rows, cols, data }
    }

    /// The transpose of a row-major `rows × cols` matrix, as a dense
    /// output-major matrix (`cols` outputs): how an input-major `x · W`
    /// weight becomes stored.
    pub fn from_input_major(rows: usize, cols: usize, w: &[f32]) -> Matrix {
        let mut data = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = w[r * cols + c];
            }
        }
        Matrix::dense(cols, rows, data)
    }

    /// `int8` with a scale per row (symmetric, round to nearest): every
    /// value is within half a scale step of the original.
    pub fn quantize_int8(rows: usize, cols: usize, data: &[f32]) -> Matrix {
        let (q, scale) = quantize_rows_int8(data, cols);
        debug_assert_eq!(scale.len(), rows);
        Matrix::Int8 {
            rows,
            cols,
            q,
            scale,
        }
    }

    /// `int4` with a scale per `group` values of a row (symmetric, ±7).
    pub fn quantize_int4(rows: usize, cols: usize, group: usize, data: &[f32]) -> Matrix {
        // A group never spans more than a row.
        let group = group.clamp(1, cols.max(1));
        let groups = cols.div_ceil(group);
        let width = cols.div_ceil(2);
        let mut packed = vec![0u8; rows * width];
        let mut scale = vec![0.0f32; rows * groups];
        let mut values = vec![0i8; group];
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let bytes = &mut packed[r * width..(r + 1) * width];
            for g in 0..groups {
                let span = g * group..((g + 1) * group).min(cols);
                let q = &mut values[..span.len()];
                scale[r * groups + g] = quantize_span(&row[span.clone()], I4_MAX, q);
                for (c, &v) in span.zip(q.iter()) {
                    let nibble = (v + 8) as u8;
                    bytes[c / 2] |= if c.is_multiple_of(2) {
                        nibble
                    } else {
                        nibble << 4
                    };
                }
            }
            if cols % 2 == 1 {
                // The padding nibble decodes to 0.
                bytes[width - 1] |= 8 << 4;
            }
        }
        Matrix::Int4 {
            rows,
            cols,
            group,
            packed,
            scale,
        }
    }

    /// Keeps the non-zero values of a dense row-major matrix as sparse rows,
    /// `int8`-quantized per row when asked. Panics beyond 65,536 columns
    /// (callers check [`Matrix::sparse_fits`]).
    pub fn sparsify(rows: usize, cols: usize, data: &[f32], int8: bool) -> Matrix {
        assert!(
            Matrix::sparse_fits(cols),
            "too many columns for u16 indices"
        );
        let mut indptr = Vec::with_capacity(rows + 1);
        let mut indices = Vec::new();
        let mut values = Vec::new();
        indptr.push(0u32);
        for r in 0..rows {
            for (c, &v) in data[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    indices.push(c as u16);
                    values.push(v);
                }
            }
            indptr.push(indices.len() as u32);
        }
        let values = if int8 {
            let mut q = vec![0i8; values.len()];
            let scale = (0..rows)
                .map(|r| {
                    let span = indptr[r] as usize..indptr[r + 1] as usize;
                    quantize_span(&values[span.clone()], I8_MAX, &mut q[span])
                })
                .collect();
            SparseValues::Int8 { q, scale }
        } else {
            SparseValues::F32(values)
        };
        Matrix::Sparse {
            rows,
            cols,
            indptr,
            indices,
            values,
        }
    }

    /// Whether a matrix with `cols` columns can be stored sparsely.
    pub fn sparse_fits(cols: usize) -> bool {
        cols <= u16::MAX as usize + 1
    }

    /// Outputs.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. }
            | Matrix::Int8 { rows, .. }
            | Matrix::Int4 { rows, .. }
            | Matrix::Sparse { rows, .. } => *rows,
            Matrix::LowRank { u, .. } => u.rows(),
        }
    }

    /// Inputs.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. }
            | Matrix::Int8 { cols, .. }
            | Matrix::Int4 { cols, .. }
            | Matrix::Sparse { cols, .. } => *cols,
            Matrix::LowRank { v, .. } => v.cols(),
        }
    }

    /// Weights stored (kept values; scales and indices not counted).
    pub fn params(&self) -> u64 {
        match self {
            Matrix::F32 { data, .. } => data.len() as u64,
            Matrix::Int8 { q, .. } => q.len() as u64,
            Matrix::Int4 { rows, cols, .. } => (rows * cols) as u64,
            Matrix::Sparse { indices, .. } => indices.len() as u64,
            Matrix::LowRank { u, v } => u.params() + v.params(),
        }
    }

    /// Bytes of the stored tensors (values, scales, indices).
    pub fn stored_bytes(&self) -> u64 {
        self.encode("m").iter().map(|t| t.3.len() as u64).sum()
    }

    /// The layout describing how it is stored.
    pub fn layout(&self) -> Layout {
        match self {
            Matrix::F32 { rows, cols, .. } => Layout::F32 {
                rows: *rows,
                cols: *cols,
            },
            Matrix::Int8 { rows, cols, .. } => Layout::Int8 {
                rows: *rows,
                cols: *cols,
            },
            Matrix::Int4 {
                rows, cols, group, ..
            } => Layout::Int4 {
                rows: *rows,
                cols: *cols,
                group: *group,
            },
            Matrix::Sparse {
                rows,
                cols,
                indices,
                values,
                ..
            } => Layout::Sparse {
                rows: *rows,
                cols: *cols,
                nnz: indices.len(),
                int8: matches!(values, SparseValues::Int8 { .. }),
            },
            Matrix::LowRank { u, v } => {
                let (rows, rank) = u.layout().shape();
                Layout::LowRank {
                    rows,
                    cols: v.layout().shape().1,
                    rank,
                    u: Box::new(u.layout()),
                    v: Box::new(v.layout()),
                }
            }
        }
    }

    /// Every value as `f32` (tests, SVD of a stored factor, inspection).
    pub fn to_dense(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0.0; rows * cols];
        for (j, row) in out.chunks_mut(cols.max(1)).enumerate().take(rows) {
            self.row_into(j, row);
        }
        out
    }

    /// Writes row `j` (an item's embedding, say) as `f32` into `out` (`cols` values).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            Matrix::F32 { cols, data, .. } => out.copy_from_slice(&data[j * cols..(j + 1) * cols]),
            Matrix::Int8 { cols, q, scale, .. } => {
                let s = scale[j];
                for (o, &v) in out.iter_mut().zip(&q[j * cols..(j + 1) * cols]) {
                    *o = s * f32::from(v);
                }
            }
            Matrix::Int4 {
                cols,
                group,
                packed,
                scale,
                ..
            } => {
                for (k, o) in out.iter_mut().enumerate().take(*cols) {
                    *o = int4_at(*cols, *group, packed, scale, j, k);
                }
            }
            Matrix::Sparse {
                indptr,
                indices,
                values,
                ..
            } => {
                out.fill(0.0);
                let span = indptr[j] as usize..indptr[j + 1] as usize;
                match values {
                    SparseValues::F32(v) => {
                        for p in span {
                            out[indices[p] as usize] = v[p];
                        }
                    }
                    SparseValues::Int8 { q, scale } => {
                        for p in span {
                            out[indices[p] as usize] = scale[j] * f32::from(q[p]);
                        }
                    }
                }
            }
            Matrix::LowRank { u, v } => {
                // Row j of U·V = Σ_t U[j, t] · V[t, :], without allocating.
                out.fill(0.0);
                for t in 0..u.cols() {
                    let c = u.get(j, t);
                    if c != 0.0 {
                        v.add_row_scaled(t, c, out);
                    }
                }
            }
        }
    }

    /// The value at `(j, k)` (dense and quantized schemes; 0 for others).
    fn get(&self, j: usize, k: usize) -> f32 {
        match self {
            Matrix::F32 { cols, data, .. } => data[j * cols + k],
            Matrix::Int8 { cols, q, scale, .. } => scale[j] * f32::from(q[j * cols + k]),
            Matrix::Int4 {
                cols,
                group,
                packed,
                scale,
                ..
            } => int4_at(*cols, *group, packed, scale, j, k),
            Matrix::Sparse { .. } | Matrix::LowRank { .. } => {
                let mut row = vec![0.0; self.cols()];
                self.row_into(j, &mut row);
                row[k]
            }
        }
    }

    /// `out += c · row j`.
    fn add_row_scaled(&self, j: usize, c: f32, out: &mut [f32]) {
        match self {
            Matrix::F32 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[j * cols..(j + 1) * cols]) {
                    *o += c * v;
                }
            }
            Matrix::Int8 { cols, q, scale, .. } => {
                let s = c * scale[j];
                for (o, &v) in out.iter_mut().zip(&q[j * cols..(j + 1) * cols]) {
                    *o += s * f32::from(v);
                }
            }
            _ => {
                let mut row = vec![0.0; self.cols()];
                self.row_into(j, &mut row);
                for (o, v) in out.iter_mut().zip(&row) {
                    *o += c * v;
                }
            }
        }
    }

    /// `out[i · ldo + j] = Σ_k x[i · cols + k] · M[j, k]` for the `n` rows
    /// of `x`: overwrites `rows` values of each of `n` output rows.
    pub fn apply(&self, x: &[f32], n: usize, out: &mut [f32], ldo: usize) {
        let (rows, cols) = (self.rows(), self.cols());
        assert!(x.len() >= n * cols, "input smaller than n × cols");
        assert!(
            n == 0 || (n - 1) * ldo + rows <= out.len(),
            "output too small"
        );
        if n == 0 || rows == 0 {
            return;
        }
        let work = n * rows * cols;
        match self {
            Matrix::F32 { data, .. } => {
                let par = if work >= PARALLEL_WORK {
                    super::sasrec::kernels::par_all()
                } else {
                    gemm::Parallelism::None
                };
                matmul(
                    out,
                    ldo,
                    View::rm(&x[..n * cols], n, cols),
                    View::rm(data, rows, cols).t(),
                    false,
                    1.0,
                    par,
                );
            }
            Matrix::Int8 { q, scale, .. } => {
                let (xq, xs) = quantize_activations(&x[..n * cols], cols);
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    let xq = &xq[first * cols..(first + count) * cols];
                    int8_product(xq, &xs[first..first + count], cols, q, scale, o, ldo);
                });
            }
            Matrix::Int4 {
                group,
                packed,
                scale,
                ..
            } if *group >= cols => {
                // One scale per row: the packed rows are widened to int8 in a
                // scratch buffer per call and run through the int8 product.
                let width = cols.div_ceil(2);
                let mut unpacked = vec![0i8; rows * cols];
                for (row, bytes) in unpacked
                    .chunks_exact_mut(cols)
                    .zip(packed.chunks_exact(width))
                {
                    for (c, u) in row.iter_mut().enumerate() {
                        *u = nibble(bytes, c);
                    }
                }
                let (xq, xs) = quantize_activations(&x[..n * cols], cols);
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    let xq = &xq[first * cols..(first + count) * cols];
                    int8_product(
                        xq,
                        &xs[first..first + count],
                        cols,
                        &unpacked,
                        scale,
                        o,
                        ldo,
                    );
                });
            }
            Matrix::Int4 {
                group,
                packed,
                scale,
                ..
            } => {
                let (xq, xs) = quantize_activations(&x[..n * cols], cols);
                let (width, groups) = (cols.div_ceil(2), cols.div_ceil(*group));
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    let xq = &xq[first * cols..(first + count) * cols];
                    let mut dots = vec![0i32; count];
                    let mut acc = vec![0f32; count];
                    let mut unpacked = vec![0i8; cols];
                    for j in 0..rows {
                        // Each stored row is unpacked once per block of users.
                        let bytes = &packed[j * width..(j + 1) * width];
                        for (c, u) in unpacked.iter_mut().enumerate() {
                            *u = nibble(bytes, c);
                        }
                        acc.fill(0.0);
                        for g in 0..groups {
                            let span = g * group..((g + 1) * group).min(cols);
                            let s = scale[j * groups + g];
                            dots_into(xq, count, cols, span.start, &unpacked[span], &mut dots);
                            for (a, d) in acc.iter_mut().zip(&dots) {
                                *a += s * *d as f32;
                            }
                        }
                        for (i, a) in acc.iter().enumerate() {
                            o[i * ldo + j] = xs[first + i] * a;
                        }
                    }
                });
            }
            Matrix::Sparse {
                indptr,
                indices,
                values,
                ..
            } => {
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    for i in 0..count {
                        let xi = &x[(first + i) * cols..(first + i + 1) * cols];
                        for (j, o) in o[i * ldo..i * ldo + rows].iter_mut().enumerate() {
                            let span = indptr[j] as usize..indptr[j + 1] as usize;
                            let idx = &indices[span.clone()];
                            *o = match values {
                                SparseValues::F32(v) => idx
                                    .iter()
                                    .zip(&v[span])
                                    .map(|(&c, &w)| w * xi[c as usize])
                                    .sum(),
                                SparseValues::Int8 { q, scale } => {
                                    scale[j]
                                        * idx
                                            .iter()
                                            .zip(&q[span])
                                            .map(|(&c, &w)| f32::from(w) * xi[c as usize])
                                            .sum::<f32>()
                                }
                            };
                        }
                    }
                });
            }
            Matrix::LowRank { u, v } => {
                let rank = v.rows();
                let mut inner = vec![0.0; n * rank];
                v.apply(x, n, &mut inner, rank);
                u.apply(&inner, n, out, ldo);
            }
        }
    }

    /// Writes the matrix as tensors named `prefix`, `prefix.q`, ….
    pub fn encode(&self, prefix: &str) -> Vec<Encoded> {
        let name = |suffix: &str| format!("{prefix}{suffix}");
        match self {
            Matrix::F32 { rows, cols, data } => {
                vec![(name(""), Dtype::F32, vec![*rows, *cols], f32_bytes(data))]
            }
            Matrix::Int8 {
                rows,
                cols,
                q,
                scale,
            } => vec![
                (
                    name(".q"),
                    Dtype::I8,
                    vec![*rows, *cols],
                    q.iter().map(|&v| v as u8).collect(),
                ),
                (name(".scale"), Dtype::F16, vec![*rows], f16_bytes(scale)),
            ],
            Matrix::Int4 {
                rows,
                cols,
                group,
                packed,
                scale,
            } => vec![
                (
                    name(".q4"),
                    Dtype::U8,
                    vec![*rows, cols.div_ceil(2)],
                    packed.clone(),
                ),
                (
                    name(".scale"),
                    Dtype::F16,
                    vec![*rows, cols.div_ceil(*group)],
                    f16_bytes(scale),
                ),
            ],
            Matrix::Sparse {
                rows,
                indptr,
                indices,
                values,
                ..
            } => {
                let mut out = vec![
                    (
                        name(".indptr"),
                        Dtype::U32,
                        vec![rows + 1],
                        indptr.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                    (
                        name(".indices"),
                        Dtype::U16,
                        vec![indices.len()],
                        indices.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                ];
                match values {
                    SparseValues::F32(v) => {
                        out.push((name(".values"), Dtype::F32, vec![v.len()], f32_bytes(v)))
                    }
                    SparseValues::Int8 { q, scale } => {
                        out.push((
                            name(".values.q"),
                            Dtype::I8,
                            vec![q.len()],
                            q.iter().map(|&v| v as u8).collect(),
                        ));
                        out.push((name(".scale"), Dtype::F16, vec![*rows], f16_bytes(scale)));
                    }
                }
                out
            }
            Matrix::LowRank { u, v } => {
                let mut out = u.encode(&name(".u"));
                out.extend(v.encode(&name(".v")));
                out
            }
        }
    }

    /// Rebuilds a matrix stored under `prefix` with `layout` from `tensors`,
    /// removing the tensors it uses. Every size, dtype, index and value is
    /// checked; the error says which tensor and what is wrong.
    pub fn decode(
        prefix: &str,
        layout: &Layout,
        tensors: &mut HashMap<String, (Dtype, Vec<usize>, &[u8])>,
    ) -> std::result::Result<Matrix, String> {
        let (rows, cols) = layout.shape();
        let elements = rows
            .checked_mul(cols)
            .filter(|&e| e <= 1 << 34)
            .ok_or_else(|| format!("{prefix}: {rows} × {cols} is too large"))?;
        if rows == 0 || cols == 0 {
            return Err(format!("{prefix}: empty matrix {rows} × {cols}"));
        }
        let mut take = |suffix: &str, dtype: Dtype, shape: Vec<usize>| {
            let name = format!("{prefix}{suffix}");
            let (d, s, bytes) = tensors
                .remove(&name)
                .ok_or_else(|| format!("missing tensor {name}"))?;
            if d != dtype || s != shape {
                return Err(format!(
                    "tensor {name} is {d:?} {s:?}, its layout needs {dtype:?} {shape:?}"
                ));
            }
            Ok(bytes)
        };
        let scales = |bytes: &[u8], name: &str| -> std::result::Result<Vec<f32>, String> {
            let v = read_f16(bytes);
            if v.iter().any(|s| !s.is_finite() || *s < 0.0) {
                return Err(format!("{prefix}{name}: scales must be finite and ≥ 0"));
            }
            Ok(v)
        };
        Ok(match layout {
            Layout::F32 { .. } => {
                let data = read_f32(take("", Dtype::F32, vec![rows, cols])?);
                if data.iter().any(|v| !v.is_finite()) {
                    return Err(format!("{prefix}: non-finite weight"));
                }
                Matrix::F32 { rows, cols, data }
            }
            Layout::Int8 { .. } => {
                let q = take(".q", Dtype::I8, vec![rows, cols])?
                    .iter()
                    .map(|&b| b as i8)
                    .collect();
                let scale = scales(take(".scale", Dtype::F16, vec![rows])?, ".scale")?;
                Matrix::Int8 {
                    rows,
                    cols,
                    q: clamp_i8(q),
                    scale,
                }
            }
            Layout::Int4 { group, .. } => {
                if *group == 0 || *group > cols {
                    return Err(format!(
                        "{prefix}: group {group} must be in 1..={cols} (the row width)"
                    ));
                }
                let groups = cols.div_ceil(*group);
                let packed = take(".q4", Dtype::U8, vec![rows, cols.div_ceil(2)])?.to_vec();
                let scale = scales(take(".scale", Dtype::F16, vec![rows, groups])?, ".scale")?;
                Matrix::Int4 {
                    rows,
                    cols,
                    group: *group,
                    packed,
                    scale,
                }
            }
            Layout::Sparse { nnz, int8, .. } => {
                if !Matrix::sparse_fits(cols) {
                    return Err(format!("{prefix}: {cols} columns exceed 16-bit indices"));
                }
                if *nnz > elements {
                    return Err(format!(
                        "{prefix}: {nnz} values in a {rows} × {cols} matrix"
                    ));
                }
                let indptr: Vec<u32> = take(".indptr", Dtype::U32, vec![rows + 1])?
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let indices: Vec<u16> = take(".indices", Dtype::U16, vec![*nnz])?
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                if indptr[0] != 0 || indptr[rows] as usize != *nnz {
                    return Err(format!(
                        "{prefix}.indptr must run from 0 to the {nnz} values"
                    ));
                }
                for j in 0..rows {
                    let (a, b) = (indptr[j] as usize, indptr[j + 1] as usize);
                    if a > b || b > *nnz {
                        return Err(format!(
                            "{prefix}.indptr decreases or passes the {nnz} values at row {j}"
                        ));
                    }
                    let row = &indices[a..b];
                    if row.iter().any(|&c| c as usize >= cols)
                        || row.windows(2).any(|w| w[0] >= w[1])
                    {
                        return Err(format!(
                            "{prefix}.indices of row {j} are not increasing columns below {cols}"
                        ));
                    }
                }
                let values = if *int8 {
                    let q = take(".values.q", Dtype::I8, vec![*nnz])?
                        .iter()
                        .map(|&b| b as i8)
                        .collect();
                    let scale = scales(take(".scale", Dtype::F16, vec![rows])?, ".scale")?;
                    SparseValues::Int8 {
                        q: clamp_i8(q),
                        scale,
                    }
                } else {
                    let v = read_f32(take(".values", Dtype::F32, vec![*nnz])?);
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(format!("{prefix}.values: non-finite weight"));
                    }
                    SparseValues::F32(v)
                };
                Matrix::Sparse {
                    rows,
                    cols,
                    indptr,
                    indices,
                    values,
                }
            }
            Layout::LowRank { rank, u, v, .. } => {
                if matches!(**u, Layout::LowRank { .. } | Layout::Sparse { .. })
                    || matches!(**v, Layout::LowRank { .. } | Layout::Sparse { .. })
                {
                    return Err(format!(
                        "{prefix}: low-rank factors must be dense or quantized"
                    ));
                }
                if u.shape() != (rows, *rank) || v.shape() != (*rank, cols) {
                    return Err(format!(
                        "{prefix}: factors {:?} · {:?} do not make {rows} × {cols} at rank {rank}",
                        u.shape(),
                        v.shape()
                    ));
                }
                let u = Matrix::decode(&format!("{prefix}.u"), u, tensors)?;
                let v = Matrix::decode(&format!("{prefix}.v"), v, tensors)?;
                Matrix::LowRank {
                    u: Box::new(u),
                    v: Box::new(v),
                }
            }
        })
    }
}

/// −128 never comes out of quantization; a file holding it is read as −127
/// (keeps the integer kernel free of saturation).
fn clamp_i8(mut q: Vec<i8>) -> Vec<i8> {
    for v in &mut q {
        if *v == i8::MIN {
            *v = -127;
        }
    }
    q
}

/// Element `(j, k)` of an `int4` matrix.
fn int4_at(cols: usize, group: usize, packed: &[u8], scale: &[f32], j: usize, k: usize) -> f32 {
    let width = cols.div_ceil(2);
    scale[j * cols.div_ceil(group) + k / group] * f32::from(nibble(&packed[j * width..], k))
}

fn nibble(bytes: &[u8], c: usize) -> i8 {
    let b = bytes[c / 2];
    let n = if c.is_multiple_of(2) {
        b & 0x0f
    } else {
        b >> 4
    };
    n as i8 - 8
}

/// Quantizes each `cols`-wide row of `x` to `int8` with its own scale
/// (`f16`-representable, rounded up): `x ≈ scale · q`.
pub fn quantize_rows_int8(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0.0f32; rows];
    for ((row, qrow), s) in x
        .chunks_exact(cols.max(1))
        .zip(q.chunks_exact_mut(cols.max(1)))
        .zip(scale.iter_mut())
    {
        *s = quantize_span(row, I8_MAX, qrow);
    }
    (q, scale)
}

/// Runs `f(first, count, out_from_row_first)` over blocks of the `n`
/// input rows, in parallel when the product is large; each block writes
/// its own output rows.
fn for_user_blocks(
    out: &mut [f32],
    ldo: usize,
    n: usize,
    work: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    let block = if work >= PARALLEL_WORK && n > 1 {
        n.div_ceil(threads * 2).max(1)
    } else {
        n
    };
    let end = (n - 1) * ldo + (out.len() - (n - 1) * ldo).min(ldo);
    let used = &mut out[..end];
    used.par_chunks_mut(block * ldo)
        .enumerate()
        .for_each(|(b, o)| {
            let first = b * block;
            f(first, block.min(n - first), o)
        });
}

/// `out[i · ldo + j] = xs[i] · scale[j] · Σ_k xq[i, k] · q[j, k]` for every
/// row `i` of `xq` and every stored row `j` (`scale.len()` of them).
fn int8_product(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if cols >= 16 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { int8_product_avx2(xq, xs, cols, q, scale, out, ldo) };
            return;
        }
    }
    for (i, &s) in xs.iter().enumerate() {
        let x = &xq[i * cols..(i + 1) * cols];
        for (j, &sj) in scale.iter().enumerate() {
            out[i * ldo + j] = s * sj * dot_i8_portable(x, &q[j * cols..(j + 1) * cols]) as f32;
        }
    }
}

/// The AVX2 product: one input row against eight stored rows at a time,
/// 32 columns per step (`maddubs` on |x| and the rows signed by x), the
/// eight sums reduced together and scaled in one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_product_avx2(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let (n, rows) = (xs.len(), scale.len());
    assert!(xq.len() >= n * cols && q.len() >= rows * cols);
    assert!(n == 0 || out.len() >= (n - 1) * ldo + rows);
    let full = cols / 32 * 32;
    // Columns covered by whole 32- and 16-wide steps.
    let half = if cols - full >= 16 { full + 16 } else { full };
    let ones = _mm256_set1_epi16(1);
    // SAFETY (all loads and stores below): offsets stay within the lengths asserted above.
    let load = |p: *const i8| unsafe { _mm256_loadu_si256(p as *const __m256i) };
    for i in 0..n {
        let x = &xq[i * cols..(i + 1) * cols];
        let o = &mut out[i * ldo..i * ldo + rows];
        let xscale = _mm256_set1_ps(xs[i]);
        let mut j = 0;
        while j + 8 <= rows {
            let mut acc = [_mm256_setzero_si256(); 8];
            let mut k = 0;
            while k < full {
                let xv = load(unsafe { x.as_ptr().add(k) });
                let abs_x = _mm256_sign_epi8(xv, xv);
                for (u, a) in acc.iter_mut().enumerate() {
                    let qv = load(unsafe { q.as_ptr().add((j + u) * cols + k) });
                    let pairs = _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(qv, xv));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
                k += 32;
            }
            if half > full {
                // 16 more columns in 128-bit registers.
                let x16 = unsafe { _mm_loadu_si128(x.as_ptr().add(full) as *const __m128i) };
                let abs_x = _mm_sign_epi8(x16, x16);
                for (u, a) in acc.iter_mut().enumerate() {
                    let q16 = unsafe {
                        _mm_loadu_si128(q.as_ptr().add((j + u) * cols + full) as *const __m128i)
                    };
                    let pairs = _mm_maddubs_epi16(abs_x, _mm_sign_epi8(q16, x16));
                    let sums = _mm_madd_epi16(pairs, _mm_set1_epi16(1));
                    *a = _mm256_add_epi32(*a, _mm256_zextsi128_si256(sums));
                }
            }
            let h01 = _mm256_hadd_epi32(acc[0], acc[1]);
            let h23 = _mm256_hadd_epi32(acc[2], acc[3]);
            let h45 = _mm256_hadd_epi32(acc[4], acc[5]);
            let h67 = _mm256_hadd_epi32(acc[6], acc[7]);
            let lo = _mm256_hadd_epi32(h01, h23);
            let hi = _mm256_hadd_epi32(h45, h67);
            let mut sums = _mm256_add_epi32(
                _mm256_permute2x128_si256(lo, hi, 0x20),
                _mm256_permute2x128_si256(lo, hi, 0x31),
            );
            if half < cols {
                let mut tail = [0i32; 8];
                for (u, t) in tail.iter_mut().enumerate() {
                    *t = dot_i8_portable(&x[half..], &q[(j + u) * cols + half..(j + u + 1) * cols]);
                }
                sums = _mm256_add_epi32(sums, unsafe {
                    _mm256_loadu_si256(tail.as_ptr() as *const __m256i)
                });
            }
            let scales = unsafe { _mm256_loadu_ps(scale.as_ptr().add(j)) };
            let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), scales), xscale);
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(j), v) };
            j += 8;
        }
        for jj in j..rows {
            o[jj] = xs[i] * scale[jj] * dot_i8(x, &q[jj * cols..(jj + 1) * cols]) as f32;
        }
    }
}

/// Quantizes each `cols`-wide row of activations to `int8` with an `f32`
/// scale of its own (max |x| / 127).
fn quantize_activations(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = x.len() / cols;
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0.0f32; rows];
    for ((row, qrow), s) in x
        .chunks_exact(cols)
        .zip(q.chunks_exact_mut(cols))
        .zip(scale.iter_mut())
    {
        let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if max > 0.0 && max.is_finite() {
            *s = max / I8_MAX;
            let inv = I8_MAX / max;
            for (o, &v) in qrow.iter_mut().zip(row) {
                // Round to nearest by the 1.5·2²³ trick (|v · inv| ≤ 127):
                // vectorizes, unlike `f32::round`.
                *o = ((v * inv + ROUNDER) - ROUNDER) as i8;
            }
        }
    }
    (q, scale)
}

/// `dots[i] = Σ_k xq[i · stride + offset + k] · row[k]` for `count` rows of `xq`.
fn dots_into(xq: &[i8], count: usize, stride: usize, offset: usize, row: &[i8], dots: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if row.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { dots_avx2(xq, count, stride, offset, row, dots) };
            return;
        }
    }
    for (i, d) in dots.iter_mut().enumerate().take(count) {
        let x = &xq[i * stride + offset..i * stride + offset + row.len()];
        *d = dot_i8_portable(x, row);
    }
}

/// Four rows of `xq` against one stored row at a time: the row's absolute
/// values are computed once per 32 columns and the four sums reduced
/// together.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(
    xq: &[i8],
    count: usize,
    stride: usize,
    offset: usize,
    row: &[i8],
    dots: &mut [i32],
) {
    use std::arch::x86_64::*;
    let len = row.len();
    let full = len / 32 * 32;
    assert!(count == 0 || (count - 1) * stride + offset + len <= xq.len());
    assert!(dots.len() >= count);
    let ones = _mm256_set1_epi16(1);
    let load = |p: *const i8| {
        // SAFETY: every pointer below stays inside `xq` or `row` (asserted above).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    };
    let mut i = 0;
    while i + 4 <= count {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut k = 0;
        while k < full {
            // SAFETY: k + 32 ≤ full ≤ len.
            let r = load(unsafe { row.as_ptr().add(k) });
            let abs_r = _mm256_sign_epi8(r, r);
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: (i + u) < count, so the 32 bytes lie inside xq.
                let x = load(unsafe { xq.as_ptr().add((i + u) * stride + offset + k) });
                let pairs = _mm256_maddubs_epi16(abs_r, _mm256_sign_epi8(x, r));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
            k += 32;
        }
        let h = _mm256_hadd_epi32(
            _mm256_hadd_epi32(acc[0], acc[1]),
            _mm256_hadd_epi32(acc[2], acc[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let mut sums = [0i32; 4];
        // SAFETY: `sums` holds four i32.
        unsafe { _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, s) };
        if full == len {
            dots[i..i + 4].copy_from_slice(&sums);
        } else {
            for (u, sum) in sums.iter().enumerate() {
                let base = (i + u) * stride + offset;
                dots[i + u] = sum + dot_i8_portable(&xq[base + full..base + len], &row[full..]);
            }
        }
        i += 4;
    }
    for (u, d) in dots.iter_mut().enumerate().take(count).skip(i) {
        let base = u * stride + offset;
        *d = dot_i8(&xq[base..base + len], row);
    }
}

/// `Σ a_k · b_k` in `i32`. Inputs lie in `[-127, 127]`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_portable(a, b)
}

fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// 32 products per step: `maddubs(|a|, sign(b, a))` pairs them into `i16`
/// (at most 2 · 127 · 127, no saturation), `madd` with ones into `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let mut k = 0;
    while k + 32 <= n {
        // SAFETY: k + 32 ≤ n ≤ both lengths; unaligned loads.
        let (va, vb) = unsafe {
            (
                _mm256_loadu_si256(a.as_ptr().add(k) as *const __m256i),
                _mm256_loadu_si256(b.as_ptr().add(k) as *const __m256i),
            )
        };
        let abs_a = _mm256_sign_epi8(va, va);
        let signed_b = _mm256_sign_epi8(vb, va);
        let pairs = _mm256_maddubs_epi16(abs_a, signed_b);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        k += 32;
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256(acc, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) + dot_i8_portable(&a[k..n], &b[k..n])
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// Little-endian `f32` values.
pub fn read_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_f16(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn dense_apply(m: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * rows];
        for i in 0..n {
            for j in 0..rows {
                out[i * rows + j] = (0..cols).map(|k| x[i * cols + k] * m[j * cols + k]).sum();
            }
        }
        out
    }

    fn round_trip(m: &Matrix) -> Matrix {
        let encoded = m.encode("w");
        let mut tensors: HashMap<String, (Dtype, Vec<usize>, &[u8])> = encoded
            .iter()
            .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.as_slice())))
            .collect();
        let back = Matrix::decode("w", &m.layout(), &mut tensors).unwrap();
        assert!(tensors.is_empty(), "unused tensors: {:?}", tensors.keys());
        back
    }

    #[test]
    fn int8_error_is_within_half_a_step_per_row() {
        let (rows, cols) = (37, 45);
        let w = random(rows * cols, 1);
        let m = Matrix::quantize_int8(rows, cols, &w);
        let Matrix::Int8 { scale, .. } = &m else {
            panic!()
        };
        let back = m.to_dense();
        for j in 0..rows {
            let max = w[j * cols..(j + 1) * cols]
                .iter()
                .fold(0.0f32, |a, v| a.max(v.abs()));
            assert!(scale[j] >= max / 127.0 && scale[j] <= max / 127.0 * 1.001);
            for k in 0..cols {
                let err = (w[j * cols + k] - back[j * cols + k]).abs();
                assert!(
                    err <= scale[j] / 2.0 + 1e-7,
                    "row {j}: {err} > {}",
                    scale[j] / 2.0
                );
            }
        }
        assert_eq!(round_trip(&m), m);
        // One byte per value plus a 2-byte scale per row.
        assert_eq!(m.stored_bytes(), (rows * cols + 2 * rows) as u64);
    }

    #[test]
    fn int4_error_is_within_half_a_step_per_group() {
        let (rows, cols, group) = (9, 45, 16);
        let w = random(rows * cols, 2);
        let m = Matrix::quantize_int4(rows, cols, group, &w);
        let Matrix::Int4 { scale, .. } = &m else {
            panic!()
        };
        let back = m.to_dense();
        let groups = cols.div_ceil(group);
        for j in 0..rows {
            for k in 0..cols {
                let s = scale[j * groups + k / group];
                let err = (w[j * cols + k] - back[j * cols + k]).abs();
                assert!(err <= s / 2.0 + 1e-7, "({j}, {k}): {err} > {}", s / 2.0);
            }
        }
        assert_eq!(round_trip(&m), m);
        // Half a byte per value (rows padded to whole bytes), 2 bytes per group scale.
        assert_eq!(
            m.stored_bytes(),
            (rows * cols.div_ceil(2) + 2 * rows * groups) as u64
        );
    }

    #[test]
    fn products_on_stored_values_equal_dequantized_products() {
        // Column counts exercising the 32-wide steps, the 16-wide step and the scalar tail.
        for cols in [70, 48, 16, 5] {
            let n = 5;
            let x = random(n * cols, 3);
            let w = random(33 * cols, 4);
            let mut sparse_w = w.clone();
            for (i, v) in sparse_w.iter_mut().enumerate() {
                if i % 3 != 0 {
                    *v = 0.0;
                }
            }
            let u = random(33 * 6, 5);
            let v = random(6 * cols, 6);
            let cases = vec![
                Matrix::dense(33, cols, w.clone()),
                Matrix::quantize_int8(33, cols, &w),
                Matrix::quantize_int4(33, cols, 32, &w),
                Matrix::sparsify(33, cols, &sparse_w, false),
                Matrix::sparsify(33, cols, &sparse_w, true),
                Matrix::LowRank {
                    u: Box::new(Matrix::dense(33, 6, u.clone())),
                    v: Box::new(Matrix::dense(6, cols, v.clone())),
                },
            ];
            for m in cases {
                let dense = m.to_dense();
                let want = dense_apply(&dense, 33, cols, &x, n);
                // Written into a wider output (a column block of qkv, say).
                let ldo = 40;
                let mut got = vec![f32::NAN; n * ldo];
                m.apply(&x, n, &mut got, ldo);
                // Input quantization: each x is within half a step of its row's max / 127.
                for i in 0..n {
                    let xmax = x[i * cols..(i + 1) * cols]
                        .iter()
                        .fold(0.0f32, |a, v| a.max(v.abs()));
                    for j in 0..33 {
                        let row_l1: f32 = dense[j * cols..(j + 1) * cols]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        let bound = xmax / 127.0 / 2.0 * row_l1 * 1.01 + 1e-4;
                        let (g, w) = (got[i * ldo + j], want[i * 33 + j]);
                        assert!((g - w).abs() <= bound, "{:?}: {g} vs {w}", m.layout());
                    }
                    assert!(got[i * ldo + 33..(i + 1) * ldo].iter().all(|v| v.is_nan()));
                }
                assert_eq!(round_trip(&m), m);
            }
        }
    }

    #[test]
    fn the_avx2_dot_equals_the_portable_one() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [0, 1, 31, 32, 33, 64, 100, 512] {
            let a: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            let b: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            assert_eq!(dot_i8(&a, &b), dot_i8_portable(&a, &b), "len {len}");
        }
        let extreme = vec![-127i8; 64];
        assert_eq!(dot_i8(&extreme, &extreme), 64 * 127 * 127);
    }

    #[test]
    fn sparse_files_hold_only_the_kept_values() {
        let (rows, cols) = (20, 40);
        let mut w = random(rows * cols, 8);
        for (i, v) in w.iter_mut().enumerate() {
            if i % 4 != 0 {
                *v = 0.0;
            }
        }
        let nnz = rows * cols / 4;
        let m = Matrix::sparsify(rows, cols, &w, false);
        assert_eq!(m.params(), nnz as u64);
        assert_eq!(m.to_dense(), w);
        // 4 bytes per offset, 2 per index, 4 per value.
        assert_eq!(m.stored_bytes(), (4 * (rows + 1) + 6 * nnz) as u64);
        let q = Matrix::sparsify(rows, cols, &w, true);
        assert_eq!(
            q.stored_bytes(),
            (4 * (rows + 1) + 3 * nnz + 2 * rows) as u64
        );
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        let m = Matrix::sparsify(
            3,
            4,
            &[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0],
            false,
        );
        let encoded = m.encode("w");
        let tensors = |e: &[Encoded]| -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
            e.iter()
                .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.clone())))
                .collect()
        };
        let decode = |t: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, layout: &Layout| {
            let mut view: HashMap<String, (Dtype, Vec<usize>, &[u8])> = t
                .iter()
                .map(|(n, (d, s, b))| (n.clone(), (*d, s.clone(), b.as_slice())))
                .collect();
            Matrix::decode("w", layout, &mut view)
        };
        let good = tensors(&encoded);
        assert!(decode(&good, &m.layout()).is_ok());
        // An index past the last column.
        let mut bad = good.clone();
        bad.get_mut("w.indices").unwrap().2[0] = 9;
        assert!(decode(&bad, &m.layout()).unwrap_err().contains("indices"));
        // Offsets that run past the values.
        let mut bad = good.clone();
        bad.get_mut("w.indptr").unwrap().2[4] = 200;
        assert!(decode(&bad, &m.layout()).is_err());
        // A layout claiming another shape, a huge one, a nested factorization.
        assert!(
            decode(
                &good,
                &Layout::Sparse {
                    rows: 4,
                    cols: 4,
                    nnz: 4,
                    int8: false
                }
            )
            .is_err()
        );
        assert!(
            decode(
                &good,
                &Layout::F32 {
                    rows: usize::MAX,
                    cols: 2
                }
            )
            .is_err()
        );
        let nested = Layout::LowRank {
            rows: 3,
            cols: 4,
            rank: 1,
            u: Box::new(Layout::Sparse {
                rows: 3,
                cols: 1,
                nnz: 1,
                int8: false,
            }),
            v: Box::new(Layout::F32 { rows: 1, cols: 4 }),
        };
        assert!(decode(&good, &nested).is_err());
        // Negative or NaN scales.
        let q = Matrix::quantize_int8(2, 2, &[1.0, 2.0, 3.0, 4.0]);
        let mut t = tensors(&q.encode("w"));
        t.get_mut("w.scale").unwrap().2[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert!(decode(&t, &q.layout()).unwrap_err().contains("scales"));
    }
}
